"""AdaLoRA's rank allocation during training: importance scores, the budget schedule, masks on Λ.

`cm.update_and_allocate(step)` (HF PEFT's name) runs it once per optimizer step, after
`optimizer.step()` and before `zero_grad()`; `AdaloraCallback` does that under a transformers Trainer.
The rule is HF PEFT's RankAllocator: per tensor, importance |p ⊙ ∇p| smoothed by an EMA (β1) and
its uncertainty by another (β2); a rank's score is its Λ entry's plus the means of its Q row and P
column; the lowest scores over all sites are pruned to the budget, which falls cubically from
Σ init_r to target_r per site between tinit and total_step - tfinal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from peftc.ir import adapters

SCORED = ("A", "B", "E")


@dataclass
class RankAllocator:
    """The allocation state of one adalora spec entry."""

    config: object  # the entry's AdaloraConfig
    sites: list[tuple[str, nn.Module]]  # (site path, AdaloraWeights), in adapter-tree order
    rank_pattern: dict[str, list[bool]] | None = None  # site path -> kept ranks, after the first mask
    ipt: dict = field(default_factory=dict)
    exp_avg_ipt: dict = field(default_factory=dict)
    exp_avg_unc: dict = field(default_factory=dict)

    @property
    def init_budget(self) -> int:
        return sum(module.E.shape[0] for _, module in self.sites)

    @property
    def target_budget(self) -> int:
        return self.config.target_r * len(self.sites)

    def budget(self, step: int) -> tuple[int, bool]:
        """(ranks allowed at `step`, whether to mask now)."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        remaining = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * (remaining ** 3) + self.target_budget)
        return budget, step % c.deltaT == 0

    def step(self, global_step: int) -> None:
        """HF PEFT's AdaLoraModel.update_and_allocate: score and mask while budgeting, fix the pattern at
        total_step - tfinal, then keep applying it."""
        final = self.config.total_step - self.config.tfinal
        if global_step < final:
            self._update_scores()
            budget, mask_now = self.budget(global_step)
            if mask_now:
                self._mask_to(budget)
        elif global_step == final:
            self._mask_to(self.budget(global_step)[0])
            self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}
        elif self.rank_pattern is not None:
            self._apply_pattern()

    @torch.no_grad()
    def _update_scores(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for path, module in self.sites:
            for name in SCORED:
                key, p = (path, name), getattr(module, name)
                if p.grad is None:
                    raise RuntimeError(f"update_and_allocate: {path}.{name} has no gradient; call it after "
                                       "loss.backward() and before optimizer.zero_grad()")
                if key not in self.ipt:
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                self.ipt[key] = (p * p.grad).abs()
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]
                uncertainty = (self.ipt[key] - self.exp_avg_ipt[key]).abs()
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * uncertainty

    def _score(self, path: str, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[(path, name)] * self.exp_avg_unc[(path, name)]

    def _rank_scores(self, path: str) -> torch.Tensor:
        """[r]: Λ's score + (mean over Q's row + mean over P's column), per rank."""
        a = self._score(path, "A").mean(dim=1, keepdim=True)
        b = self._score(path, "B").mean(dim=0).view(-1, 1)
        return self._score(path, "E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1)

    @torch.no_grad()
    def _mask_to(self, budget: int) -> None:
        scores = {path: self._rank_scores(path) for path, _ in self.sites}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_budget - budget)[0].item()
        self.rank_pattern = {path: (s > threshold).tolist() for path, s in scores.items()}
        self._apply_pattern()

    @torch.no_grad()
    def _apply_pattern(self) -> None:
        for path, module in self.sites:
            kept = torch.tensor(self.rank_pattern[path], device=module.E.device)
            module.E.masked_fill_(~kept.view(-1, 1), 0.0)
            module.rank_mask.copy_(kept)


def allocators(cm) -> list[RankAllocator]:
    """One allocator per adalora entry of the compiled model, made on first use and kept on it."""
    existing = cm.__dict__.get("_rank_allocators")
    if existing is not None:
        return existing
    made = []
    for entry, slot in zip(cm.spec.adapters, cm.spec.entry_names()):
        if entry.method != "adalora":
            continue
        sites = [(name.rpartition(".")[0], module) for name, module in adapters.adapter_modules(cm.adapter_root)
                 if name.rpartition(".")[2] == slot]
        made.append(RankAllocator(entry, sites))
    object.__setattr__(cm, "_rank_allocators", made)
    return made


def update_and_allocate(cm, global_step: int) -> None:
    found = allocators(cm)
    if not found:
        raise ValueError("update_and_allocate: this model's spec has no 'adalora' entry")
    for allocator in found:
        allocator.step(global_step)

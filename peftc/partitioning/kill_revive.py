"""Kill and Revive (DLoRA): switch off adapter sites whose updates stayed small, switch them back on later.

    kr = KillRevive(threshold=1e-3, patience=3, revive_every=20)
    part = peftc.partition(cm, kill_revive=kr)        # or connect(cm, kill_revive=kr)
    ... loss.backward(); optimizer.step(); kr.step(); optimizer.zero_grad()

After each optimizer step, `step()` measures every active site's relative update
‖θ_t − θ_{t−1}‖ / ‖θ_{t−1}‖ over its adapter tensors. A site below `threshold` for `patience`
steps in a row is killed: its tensors stop requiring grad (the optimizer skips them), its
delta stops travelling and the base adds nothing in its place, and its input stops travelling
once no live site of that exchange needs it. A killed site is revived `revive_every` steps
later, to see whether it has something left to learn. Only sites whose delta the base merges
by an add can be killed (peftc.partitioning.liveness); the others stay active. Without a
KillRevive (or with threshold 0) nothing is ever killed and the partition runs as built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peftc.errors import PartitionError
from peftc.ir import adapters


@dataclass
class KillRevive:
    threshold: float = 1e-3
    patience: int = 3
    revive_every: int = 20
    dead_sites: frozenset = frozenset()
    steps: int = 0
    events: list = field(default_factory=list)  # (step, "kill" | "revive", site)
    _params: dict = field(default_factory=dict, repr=False)  # site -> its adapter tensors
    _previous: dict = field(default_factory=dict, repr=False)  # site -> their values after the last step
    _below: dict = field(default_factory=dict, repr=False)  # site -> steps in a row under the threshold
    _killed_at: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not (self.threshold >= 0 and self.patience >= 1 and self.revive_every >= 1):
            raise PartitionError(f"KillRevive: expected threshold >= 0, patience >= 1 and revive_every >= 1, got "
                                 f"threshold={self.threshold}, patience={self.patience}, "
                                 f"revive_every={self.revive_every}")

    def bind(self, adapter_root, killable_sites) -> None:
        """Watch the adapter tensors of each killable site (a Partition calls this)."""
        for site in sorted(killable_sites):
            module = adapters.module_at(adapter_root, site, create=False)
            params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
            if params:
                self._params[site] = params
        self._previous = {site: self._snapshot(site) for site in self._params}

    @property
    def watched(self) -> tuple[str, ...]:
        return tuple(self._params)

    def _snapshot(self, site: str) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self._params[site]]

    @torch.no_grad()
    def step(self) -> None:
        """After optimizer.step(): kill the sites whose updates stayed small, revive those whose time is up."""
        self.steps += 1
        dead = set(self.dead_sites)
        for site in self._params:
            if site in dead:
                if self.steps - self._killed_at[site] >= self.revive_every:
                    self._set_active(site, True, dead)
                continue
            now = self._snapshot(site)
            change = sum(float((a - b).square().sum()) for a, b in zip(now, self._previous[site])) ** 0.5
            size = sum(float(b.square().sum()) for b in self._previous[site]) ** 0.5
            self._previous[site] = now
            self._below[site] = self._below.get(site, 0) + 1 if change <= self.threshold * max(size, 1e-12) else 0
            if self.threshold > 0 and self._below[site] >= self.patience:
                self._set_active(site, False, dead)
        self.dead_sites = frozenset(dead)

    def _set_active(self, site: str, active: bool, dead: set) -> None:
        for param in self._params[site]:
            param.requires_grad_(active)
            param.grad = None
        if active:
            dead.discard(site)
            self._below[site] = 0
            self._previous[site] = self._snapshot(site)
        else:
            dead.add(site)
            self._killed_at[site] = self.steps
        self.events.append((self.steps, "revive" if active else "kill", site))

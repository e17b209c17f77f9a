"""insert_adalora: add an SVD-form update y = W x + s/r0 · P(Λ ⊙ Q x), and its orthogonality term to the loss."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import (
    fraction,
    non_negative_int,
    optional_pattern_list,
    pattern_list,
    positive_int,
    positive_number,
    probability,
)
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import add_output, maybe_dropout

aten = torch.ops.aten
RANKNUM_EPS = 1e-5  # HF PEFT divides by ranknum + 1e-5


def _open_fraction(value, path: str) -> float:
    """β1, β2: EMA coefficients strictly between 0 and 1 (HF PEFT asserts the same)."""
    value = fraction(value, path)
    if not 0 < value < 1:
        raise SpecError(f"{path}: expected a number strictly between 0 and 1, got {value!r}")
    return value


def _non_negative_number(value, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise SpecError(f"{path}: expected a finite number >= 0, got {value!r}")
    return float(value)


def _rank_masks(value, path: str) -> dict:
    """{site path: [kept?, ...]}: the ranks a finished allocation kept (HF PEFT's rank_pattern)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise SpecError(f"{path}: expected a mapping of site paths to lists of booleans, got {value!r}")
    for key, mask in value.items():
        if not isinstance(mask, (list, tuple)) or not mask or not all(isinstance(b, bool) for b in mask):
            raise SpecError(f"{path}[{key!r}]: expected a non-empty list of booleans, got {mask!r}")
    return {k: tuple(v) for k, v in value.items()}


@dataclass(frozen=True)
class AdaloraConfig:
    """AdaLoRA (Zhang et al., 2023) as HF PEFT's AdaLoRA: P (lora_B), Λ (lora_E), Q (lora_A) start at rank
    `init_r`; `cm.update_and_allocate(step)` prunes them to an average of `target_r` over `total_step` steps
    (warm-up `tinit`, final `tfinal`, every `deltaT`), scoring importance with EMAs `beta1`, `beta2`."""

    method = "adalora"
    targets: tuple = field(metadata={"check": pattern_list})
    total_step: int = field(metadata={"check": positive_int})
    init_r: int = field(default=12, metadata={"check": positive_int})
    target_r: int = field(default=8, metadata={"check": positive_int})
    alpha: float = field(default=8, metadata={"check": positive_number})
    dropout: float = field(default=0.0, metadata={"check": probability})
    tinit: int = field(default=0, metadata={"check": non_negative_int})
    tfinal: int = field(default=0, metadata={"check": non_negative_int})
    deltaT: int = field(default=1, metadata={"check": positive_int})
    beta1: float = field(default=0.85, metadata={"check": _open_fraction})
    beta2: float = field(default=0.85, metadata={"check": _open_fraction})
    orth_reg_weight: float = field(default=0.5, metadata={"check": _non_negative_number})
    # Ranks kept at each site by a finished allocation (a loaded PEFT checkpoint's rank_pattern).
    rank_pattern: dict = field(default_factory=dict, metadata={"check": _rank_masks})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})

    def validate(self, path: str) -> None:
        if self.tinit >= self.total_step - self.tfinal:
            raise SpecError(f"{path}.tinit: {self.tinit} leaves no budgeting phase before total_step - tfinal = "
                            f"{self.total_step - self.tfinal}; lower tinit or tfinal, or raise total_step")
        for site, mask in self.rank_pattern.items():
            if len(mask) != self.init_r:
                raise SpecError(f"{path}.rank_pattern[{site!r}]: {len(mask)} entries, expected init_r={self.init_r}")

    def __hash__(self) -> int:  # rank_pattern is a dict; specs stay hashable
        return hash(tuple(tuple(v.items()) if isinstance(v, dict) else v for v in vars(self).values()))

    @property
    def scale(self) -> float:
        """alpha / (ranknum + eps), ranknum being init_r even after pruning, as in HF PEFT."""
        return self.alpha / (self.init_r + RANKNUM_EPS)

    def rank_at(self, path: str) -> int:
        mask = self.rank_pattern.get(path)
        return self.init_r if mask is None else sum(mask)


class AdaloraWeights(nn.Module):
    """A = Q (r x in), E = Λ (r x 1), B = P (out x r): HF PEFT's lora_A / lora_E / lora_B.

    `rank_mask` (a buffer, saved with peftc checkpoints) marks the ranks the last allocation kept;
    the allocator zeroes E at the others, as HF PEFT does, and merge folds only the kept ones."""

    def __init__(self, site: Site, weight: torch.Tensor, config: AdaloraConfig):
        super().__init__()
        r = config.rank_at(site.path)
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.A = nn.Parameter(torch.empty(r, site.in_features, **factory))
        self.E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.B = nn.Parameter(torch.empty(site.out_features, r, **factory))
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=weight.device))
        self.loaded_pattern = config.rank_pattern.get(site.path)  # this module holds only its True ranks
        self.scale = config.scale
        if not self.A.is_meta:
            with torch.no_grad():  # as HF PEFT: Λ zero, so the update starts at zero
                self.A.normal_(0.0, 0.02)
                self.B.normal_(0.0, 0.02)

    def init_rank_pattern(self) -> list[bool]:
        """The kept ranks among the entry's init_r (HF PEFT's rank_pattern value for this module)."""
        mask = self.rank_mask.tolist()
        if self.loaded_pattern is None:
            return mask
        kept = iter(mask)
        return [next(kept) if was_kept else False for was_kept in self.loaded_pattern]

    def to_peft(self, tensor: str, value: torch.Tensor) -> torch.Tensor:
        """The kept ranks only, as HF PEFT saves an allocated adapter (with its rank_pattern)."""
        if tensor in ("A", "E"):
            return value[self.rank_mask]
        return value[:, self.rank_mask] if tensor == "B" else value

    def delta_weight(self) -> torch.Tensor:
        """s/r0 · B[:, kept] (A[kept] ⊙ E[kept]), shaped [out, in]."""
        kept = self.rank_mask.nonzero().flatten()
        return self.B[:, kept] @ (self.A[kept] * self.E[kept]) * self.scale


def insert_adalora(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add s/r0 · B((A ⊙ E) dropout(x)) to every targeted linear op; add the orthogonality term to the loss."""
    config: AdaloraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",))
    check_one_rewrite_per_weight(gm, ctx, sites)
    unknown = sorted(set(config.rank_pattern) - {s.path for s in sites})
    if unknown:
        raise SpecError(f"adapters[{ctx.entry_index}].rank_pattern: {unknown[0]!r} is not a site of this entry")
    result = rewrite_sites(gm, ctx, sites, lambda site, weight: AdaloraWeights(site, weight, config),
                           lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))
    if config.orth_reg_weight > 0 and _add_orthogonality_term(gm, ctx, sites, config):
        result.notes.append(f"loss += {config.orth_reg_weight} · mean ||QQᵀ - I||, ||PᵀP - I|| (orthogonality)")
    return result


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: AdaloraConfig) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_adalora")
    a, e, b = (ins.get_attr(adapters.target(site.path, ctx.slot, n)) for n in ("A", "E", "B"))
    x = maybe_dropout(ins, node.args[site.input_index], config.dropout)
    hidden = ins.call(aten.linear.default, x, ins.call(aten.mul.Tensor, a, e))
    add_output(ins, node, ins.call(aten.linear.default, hidden, b), users, alpha=config.scale)


def loss_leaf(gm: GraphModule) -> tuple[Node, int] | None:
    """The output node and the index of its `loss` leaf, when this graph returns a loss (labels were passed)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    # torch.export's unlifted module keeps the output structure (a ModelOutput's keys) on its codegen
    info = getattr(gm.graph._codegen, "pytree_info", None)
    leaves = output.args[0] if isinstance(output.args[0], (tuple, list)) else None
    if info is None or info.out_spec is None or leaves is None:
        return None
    try:
        positions = pytree.tree_unflatten(list(range(len(leaves))), info.out_spec)
    except Exception:  # an output structure pytree cannot rebuild: no loss to find
        return None
    index = positions.get("loss") if isinstance(positions, dict) else getattr(positions, "loss", None)
    if not isinstance(index, int) or not isinstance(leaves[index], Node):
        return None
    return output, index


def _add_orthogonality_term(gm: GraphModule, ctx: PassContext, sites: list[Site], config: AdaloraConfig) -> bool:
    """loss + w · mean over every Q and P of ||QQᵀ - I||_F, ||PᵀP - I||_F (HF PEFT adds it whenever a loss is
    returned). False when the graph returns no loss."""
    found = loss_leaf(gm)
    if found is None:
        return False
    output, index = found
    loss = output.args[0][index]
    # Tagged as part of the first site's adapter, so merge_adapters erases the term with it (a merged
    # model has no Q and P left to regularize) and puts the plain loss back.
    tag = {"pass": "insert_adalora", "method": "adalora", "site": sites[0].path, "slot": ctx.slot,
           "entry": ctx.entry_index}
    ins = Inserter(gm, loss, tag, meta_cache=ctx.meta_cache)
    terms = []
    for site in sites:
        a = ins.get_attr(adapters.target(site.path, ctx.slot, "A"))
        b = ins.get_attr(adapters.target(site.path, ctx.slot, "B"))
        terms.append(_distance_from_identity(ins, ins.call(aten.mm.default, a, ins.call(aten.t.default, a))))
        terms.append(_distance_from_identity(ins, ins.call(aten.mm.default, ins.call(aten.t.default, b), b)))
    total = terms[0]
    for term in terms[1:]:
        total = ins.call(aten.add.Tensor, total, term)
    penalty = ins.call(aten.mul.Tensor, total, config.orth_reg_weight / len(terms))
    add_output(ins, loss, penalty, [output])
    return True


def _distance_from_identity(ins: Inserter, cov: Node) -> Node:
    """||cov - I||_F, the identity built from cov itself so the graph bakes in no device."""
    eye = ins.call(aten.diag_embed.default, ins.call(aten.ones_like.default, ins.call(aten.diagonal.default, cov)))
    return ins.call(aten.linalg_vector_norm.default, ins.call(aten.sub.Tensor, cov, eye), 2)

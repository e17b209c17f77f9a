"""insert_mask: train a fixed sparse subset of a weight's entries: y = W x + op(x, scatter(values at indices))."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    fraction,
    non_negative_int,
    one_of,
    optional_pattern_list,
    pattern_list,
)
from peftc.ir import adapters
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import add_delta_op, add_in_wider_dtype

aten = torch.ops.aten


@dataclass(frozen=True)
class MaskConfig:
    """Sparse fine-tuning (diff pruning / FISH-mask style): `density` of each weight's entries train."""

    method = "mask"
    targets: tuple = field(metadata={"check": pattern_list})
    density: float = field(default=0.01, metadata={"check": fraction})
    select: str = field(default="magnitude", metadata={"check": one_of("magnitude", "random")})
    seed: int = field(default=0, metadata={"check": non_negative_int})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


def chosen_entries(weight: torch.Tensor, config: MaskConfig) -> torch.Tensor:
    """Sorted flat indices of the round(density · numel) (at least 1) entries that train."""
    count = max(1, round(config.density * weight.numel()))
    if config.select == "magnitude":
        picked = torch.topk(weight.detach().abs().flatten().float().cpu(), count).indices
    else:
        generator = torch.Generator().manual_seed(config.seed)
        picked = torch.randperm(weight.numel(), generator=generator)[:count]
    return picked.sort().values.to(weight.device)


class MaskWeights(nn.Module):
    """values (k), trained, at `indices` (k, a buffer) into the flattened weight, in the parameter's own layout.

    indices is not persistent: it is a function of the base weight and the config, so
    checkpoints hold only the values."""

    def __init__(self, site: Site, weight: torch.Tensor, config: MaskConfig):
        super().__init__()
        indices = chosen_entries(weight, config)
        self.values = nn.Parameter(torch.zeros(indices.numel(), device=weight.device, dtype=weight.dtype))
        self.register_buffer("indices", indices, persistent=False)
        self.shape = tuple(weight.shape)

    def delta_weight(self) -> torch.Tensor:
        flat = self.values.new_zeros(torch.Size(self.shape).numel())
        return flat.index_put((self.indices,), self.values).view(self.shape)


def fold_mask(module: MaskWeights, site: Site, weight: torch.Tensor) -> torch.Tensor:
    return add_in_wider_dtype(weight, module.delta_weight())


def insert_mask(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add op(x, ΔW) for every targeted op, ΔW zero except the chosen entries, which train."""
    config: MaskConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear", "conv", "embedding"))
    check_one_rewrite_per_weight(gm, ctx, sites)
    return rewrite_sites(gm, ctx, sites, lambda site, weight: MaskWeights(site, weight, config),
                         _rewrite_site)


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, module: MaskWeights) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_mask")
    values = ins.get_attr(adapters.target(site.path, ctx.slot, "values"))
    indices = ins.get_attr(adapters.target(site.path, ctx.slot, "indices"))
    flat = ins.call(aten.new_zeros.default, values, [_numel(module)])
    delta = ins.call(aten.view.default, ins.call(aten.index_put.default, flat, [indices], values), list(module.shape))
    if site.layout == "in_out":
        delta = ins.call(aten.t.default, delta)
    add_delta_op(ins, node, site, node.args[site.input_index], delta, users)


def _numel(module: MaskWeights) -> int:
    return torch.Size(module.shape).numel()

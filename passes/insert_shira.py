"""insert_shira: train a fixed sparse, high-rank set of a weight's entries: y = W x + op(x, ΔW) (SHiRA)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    non_negative_int,
    one_of,
    optional,
    optional_pattern_list,
    pattern_list,
    positive_int,
)
from peftc.errors import SpecError
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._traced import inline_module
from ._weight_ops import add_delta_op, add_in_wider_dtype, flip_layout, out_in_shape


@dataclass(frozen=True)
class ShiraConfig:
    """SHiRA (Bhardwaj et al., 2024) as HF PEFT's ShiraConfig: r·(out + in) entries of each [out, in] weight
    train (as many as a rank-r LoRA), chosen by `mask_type` "random" from a torch.Generator seeded with
    `seed` (None: a fresh generator's default seed, as PEFT's random_seed=None)."""

    method = "shira"
    targets: tuple = field(metadata={"check": pattern_list})
    r: int = field(default=32, metadata={"check": positive_int})
    mask_type: str = field(default="random", metadata={"check": one_of("random")})
    seed: int | None = field(default=None, metadata={"check": optional(non_negative_int)})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


def random_entries(out_features: int, in_features: int, count: int, seed: int | None) -> torch.Tensor:
    """[2, count] (row, column) of the chosen entries, row-major, drawn as HF PEFT's random_mask draws them."""
    generator = torch.Generator()
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:count].sort().values
    return torch.stack([flat // in_features, flat % in_features])


class ShiraWeights(nn.Module):
    """shira_weight [k] (trained, zero at first) at shira_indices [2, k] (row, column) of the [out, in] weight,
    as HF PEFT's. The indices are not persistent: the config and the weight's shape give them again."""

    def __init__(self, site: Site, weight: torch.Tensor, config: ShiraConfig, field_path: str):
        super().__init__()
        self.shape = out_in_shape(weight, site)
        out_features, in_features = self.shape
        count = config.r * (out_features + in_features)
        if count > out_features * in_features:
            raise SpecError(f"{field_path}.r: {config.r}·({out_features} + {in_features}) = {count} entries is more "
                            f"than {site.path!r} has ({out_features * in_features}); use a smaller r")
        indices = random_entries(out_features, in_features, count, config.seed).to(weight.device)
        self.shira_weight = nn.Parameter(torch.zeros(count, device=weight.device, dtype=weight.dtype))
        self.register_buffer("shira_indices", indices, persistent=False)

    def forward(self) -> torch.Tensor:
        """ΔW [out, in]: zero except the trained entries."""
        rows, columns = self.shira_indices[0], self.shira_indices[1]
        return self.shira_weight.new_zeros(self.shape).index_put((rows, columns), self.shira_weight)


def fold_shira(module: ShiraWeights, site: Site, weight: torch.Tensor) -> torch.Tensor:
    return add_in_wider_dtype(weight, flip_layout(module(), site))


def insert_shira(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add op(x, ΔW) to every targeted linear op, ΔW zero but for a fixed random set of trained entries."""
    config: ShiraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",))
    check_one_rewrite_per_weight(gm, ctx, sites)
    field_path = f"adapters[{ctx.entry_index}]"
    return rewrite_sites(gm, ctx, sites, lambda site, weight: ShiraWeights(site, weight, config, field_path),
                         _rewrite_site)


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, module: ShiraWeights) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_shira")
    delta = inline_module(ins, ctx, site, module, [], [])
    add_delta_op(ins, node, site, node.args[site.input_index], delta, users)

"""insert_trainable_tokens: train chosen rows of an embedding: W' = W with rows `indices` replaced by a
trainable delta, wherever W is read (a tied output head reads the same rows), as HF PEFT's TrainableTokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import fail, optional_pattern_list, pattern_list
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import rewrite_parameter

aten = torch.ops.aten


def token_indices(value, path: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise fail(path, "a non-empty list of token ids (non-negative integers)", value)
    if len(set(value)) != len(value):
        raise SpecError(f"{path}: token ids repeat ({sorted(value)}); list each once")
    return tuple(value)


@dataclass(frozen=True)
class TrainableTokensConfig:
    """HF PEFT's TrainableTokens: rows `indices` of the targeted embeddings train, the rest stay frozen."""

    method = "trainable_tokens"
    targets: tuple = field(metadata={"check": pattern_list})
    indices: tuple = field(metadata={"check": token_indices})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


class TrainableTokensWeights(nn.Module):
    """delta [n, dim]: the new rows (HF PEFT's trainable_tokens_delta), starting as the current ones."""

    def __init__(self, site: Site, weight: torch.Tensor, config: TrainableTokensConfig):
        super().__init__()
        index = torch.tensor(config.indices, device=weight.device)
        self.register_buffer("index", index, persistent=False)  # from the spec, never saved
        self.not_in_peft = ("index",)  # PEFT keeps the indices in its config, not its weights
        self.delta = nn.Parameter(weight.detach()[index].clone())


def fold_trainable_tokens(module: TrainableTokensWeights, site: Site, weight: torch.Tensor) -> torch.Tensor:
    return weight.index_copy(0, module.index, module.delta.to(weight.dtype))


def insert_trainable_tokens(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace the rows `indices` of every targeted embedding's weight by a trainable delta."""
    config: TrainableTokensConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("embedding",))
    for site in sites:
        if max(config.indices) >= site.in_features:
            raise SpecError(f"adapters[{ctx.entry_index}].indices: token id {max(config.indices)} is outside the "
                            f"{site.in_features} rows of {site.path!r}")
    check_one_rewrite_per_weight(gm, ctx, sites)
    return rewrite_sites(gm, ctx, sites, lambda site, weight: TrainableTokensWeights(site, weight, config),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, site, ctx))


def _rewrite_site(gm: GraphModule, site: Site, ctx: PassContext) -> None:
    def build_weight(ins, weight):
        index = ins.get_attr(adapters.target(site.path, ctx.slot, "index"))
        delta = ins.get_attr(adapters.target(site.path, ctx.slot, "delta"))
        return ins.call(aten.index_copy.default, weight, 0, index, delta)

    rewrite_parameter(gm, site, lambda anchor: site_inserter(gm, anchor, site, ctx, "insert_trainable_tokens"),
                      build_weight)

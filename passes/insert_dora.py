"""insert_dora: weight-decomposed LoRA: y = b + (m / ||W + s·BA||) · (W x + s·B A x), the norm detached."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._low_rank import LowRankConfig
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import (
    add_output,
    bias_node,
    flip_layout,
    maybe_dropout,
    weight_out_in,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class DoraConfig(LowRankConfig):
    """DoRA (Liu et al., 2024), with HF PEFT's numerics: the column norm is a constant for autograd."""

    method = "dora"


class DoraWeights(nn.Module):
    """A (r x in), B (out x r) as HF PEFT's lora_A / lora_B, and magnitude (out) as its lora_magnitude_vector."""

    def __init__(self, site: Site, weight: torch.Tensor, config: DoraConfig):
        super().__init__()
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.A = nn.Parameter(torch.empty(config.r, site.in_features, **factory))
        self.B = nn.Parameter(torch.zeros(site.out_features, config.r, **factory))
        self.magnitude = nn.Parameter(torch.empty(site.out_features, **factory))
        self.scale = config.scale
        self.layout = site.layout
        self.reset_parameters(weight)

    @torch.no_grad()
    def reset_parameters(self, weight: torch.Tensor) -> None:
        if self.A.is_meta:
            return
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)
        self.magnitude.copy_(self.weight_norm(flip_layout(weight, self)))

    def weight_norm(self, weight_out_in: torch.Tensor) -> torch.Tensor:
        """||W + s·BA|| per output row: the column norm of HF PEFT's [in, out] convention."""
        return torch.linalg.vector_norm(weight_out_in + self.scale * (self.B @ self.A), dim=1)


def fold_dora(module: DoraWeights, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """(m / ||W + s·BA||) · (W + s·BA), row-wise, in the parameter's layout."""
    full = flip_layout(weight, site) + module.scale * (module.B @ module.A)
    scaled = (module.magnitude / module.weight_norm(flip_layout(weight, site)))[:, None] * full
    return flip_layout(scaled, site).to(weight.dtype)


def insert_dora(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Rescale every targeted linear op's output by m/||W + s·BA|| and add the scaled low-rank update."""
    config: DoraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",))
    check_one_rewrite_per_weight(gm, ctx, sites)
    return rewrite_sites(gm, ctx, sites, lambda site, weight: DoraWeights(site, weight, config),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: DoraConfig) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_dora")
    a = ins.get_attr(adapters.target(site.path, ctx.slot, "A"))
    b = ins.get_attr(adapters.target(site.path, ctx.slot, "B"))
    magnitude = ins.get_attr(adapters.target(site.path, ctx.slot, "magnitude"))
    weight = weight_out_in(ins, site)
    x = maybe_dropout(ins, node.args[site.input_index], config.dropout)
    # m / ||W + s·BA||, with the norm detached (DoRA section 4.3, as HF PEFT does)
    full = ins.call(aten.add.Tensor, weight, ins.call(aten.mul.Tensor, ins.call(aten.mm.default, b, a), config.scale))
    norm = ins.call(aten.detach.default, ins.call(aten.linalg_vector_norm.default, full, 2, [1]))
    factor = ins.call(aten.div.Tensor, magnitude, norm)
    lora = ins.call(aten.linear.default, ins.call(aten.linear.default, x, a), b)
    base = _base_without_bias(ins, node, site, x, weight, config)
    delta = ins.call(aten.add.Tensor,
                     ins.call(aten.mul.Tensor, ins.call(aten.sub.Tensor, factor, 1), base),
                     ins.call(aten.mul.Tensor, ins.call(aten.mul.Tensor, factor, lora), config.scale))
    add_output(ins, node, delta, users)


def _base_without_bias(ins: Inserter, node, site: Site, x, weight, config: DoraConfig):
    """W x: the site's output minus its bias; with dropout, W applied to the dropped input (as HF PEFT)."""
    if config.dropout > 0:
        return ins.call(aten.linear.default, x, weight)
    bias = bias_node(node, site)
    return node if bias is None else ins.call(aten.sub.Tensor, node, bias)

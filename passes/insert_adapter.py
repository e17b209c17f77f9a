"""insert_adapter: a bottleneck adapter on each targeted linear op, serial (Houlsby) or parallel (He et al.)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    boolean,
    finite_number,
    one_of,
    optional_pattern_list,
    pattern_list,
    positive_int,
)
from peftc.ir import adapters
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._per_site import rewrite_sites, site_inserter
from ._site_output import current_output
from ._site_selection import select_sites
from ._weight_ops import add_output

aten = torch.ops.aten

ACTIVATIONS = {"relu": aten.relu.default, "gelu": aten.gelu.default, "silu": aten.silu.default,
               "tanh": aten.tanh.default}


@dataclass(frozen=True)
class AdapterConfig:
    """Bottleneck adapter: y + scale * up(act(down(h))), h = y (serial) or the site's input x (parallel).

    `gate: true` multiplies the update by sigmoid(w·h + b), a learned per-token gate (UniPELT).
    """

    method = "adapter"
    targets: tuple = field(metadata={"check": pattern_list})
    placement: str = field(default="serial", metadata={"check": one_of("serial", "parallel")})
    bottleneck: int = field(default=16, metadata={"check": positive_int})
    activation: str = field(default="relu", metadata={"check": one_of(*ACTIVATIONS)})
    scale: float = field(default=1.0, metadata={"check": finite_number})
    gate: bool = field(default=False, metadata={"check": boolean})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


class AdapterWeights(nn.Module):
    """down [bottleneck, in] + bias, up [out, bottleneck] + bias (zero: the adapter starts as identity)."""

    def __init__(self, site: Site, weight: torch.Tensor, config: AdapterConfig):
        super().__init__()
        in_dim = site.out_features if config.placement == "serial" else site.in_features
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.down = nn.Parameter(torch.empty(config.bottleneck, in_dim, **factory))
        self.down_bias = nn.Parameter(torch.zeros(config.bottleneck, **factory))
        self.up = nn.Parameter(torch.zeros(site.out_features, config.bottleneck, **factory))
        self.up_bias = nn.Parameter(torch.zeros(site.out_features, **factory))
        if config.gate:
            self.gate = nn.Parameter(torch.zeros(1, in_dim, **factory))
            self.gate_bias = nn.Parameter(torch.zeros(1, **factory))
        if not self.down.is_meta:
            nn.init.kaiming_uniform_(self.down, a=5 ** 0.5)


def insert_adapter(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add scale * up(act(down(h))) [* sigmoid gate] to the output of every targeted linear op."""
    config: AdapterConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",))
    return rewrite_sites(gm, ctx, sites, lambda site, weight: AdapterWeights(site, weight, config),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: AdapterConfig) -> None:
    y = current_output(node)
    users = list(y.users)
    ins = site_inserter(gm, y, site, ctx, "insert_adapter")
    param = lambda name: ins.get_attr(adapters.target(site.path, ctx.slot, name))  # noqa: E731
    h = y if config.placement == "serial" else node.args[site.input_index]
    hidden = ins.call(ACTIVATIONS[config.activation], ins.call(aten.linear.default, h, param("down"), param("down_bias")))
    delta = ins.call(aten.mul.Tensor, ins.call(aten.linear.default, hidden, param("up"), param("up_bias")), config.scale)
    if config.gate:
        gate = ins.call(aten.sigmoid.default, ins.call(aten.linear.default, h, param("gate"), param("gate_bias")))
        delta = ins.call(aten.mul.Tensor, delta, gate)
    add_output(ins, y, delta, users)

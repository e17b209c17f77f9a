"""insert_lora: add a low-rank update beside each targeted weight op: y = W x + s * B (A dropout(x))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    boolean,
    one_of,
    optional_pattern_list,
    pattern_list,
    pattern_map,
    positive_int,
    positive_number,
    probability,
)
from peftc.core.targets import matches
from peftc.ir import adapters
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import add_output, conv_geometry, maybe_dropout

aten = torch.ops.aten


@dataclass(frozen=True)
class LoraConfig:
    """LoRA (Hu et al., 2021); `rslora` scales by alpha/sqrt(r) (Kalajdzievski, 2023)."""

    method = "lora"
    targets: tuple = field(metadata={"check": pattern_list})
    r: int = field(default=8, metadata={"check": positive_int})
    alpha: float = field(default=8, metadata={"check": positive_number})
    dropout: float = field(default=0.0, metadata={"check": probability})
    rslora: bool = field(default=False, metadata={"check": boolean})
    init: str = field(default="default", metadata={"check": one_of("default", "gaussian")})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})
    gate: bool = field(default=False, metadata={"check": boolean})  # UniPELT: update * sigmoid(w·x + b)
    # Per-site overrides, {target pattern: value}; the first pattern matching a site wins.
    rank_pattern: dict = field(default_factory=dict, metadata={"check": pattern_map(positive_int)})
    alpha_pattern: dict = field(default_factory=dict, metadata={"check": pattern_map(positive_number)})

    def __hash__(self) -> int:  # the pattern dicts would make the generated hash fail; specs stay hashable
        return hash(tuple(tuple(v.items()) if isinstance(v, dict) else v for v in vars(self).values()))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def r_at(self, path: str) -> int:
        return _first_match(self.rank_pattern, path, self.r)

    def alpha_at(self, path: str) -> float:
        return _first_match(self.alpha_pattern, path, self.alpha)

    def scale_at(self, path: str) -> float:
        """The scale at one site, after rank_pattern / alpha_pattern."""
        r = self.r_at(path)
        return self.alpha_at(path) / (math.sqrt(r) if self.rslora else r)


def _first_match(patterns: dict, path: str, default):
    return next((value for pattern, value in patterns.items() if matches(pattern, path)), default)


class LoraWeights(nn.Module):
    """A (r x in[, kernel]) and B (out x r[, 1...]), laid out as HF PEFT's lora_A / lora_B weights."""

    def __init__(self, site: Site, weight: torch.Tensor, config: LoraConfig):
        super().__init__()
        r = config.r_at(site.path)
        factory = dict(device=weight.device, dtype=weight.dtype)
        if site.kind == "conv":
            kernel = tuple(weight.shape[2:])
            a_shape, b_shape = (r, site.in_features, *kernel), (site.out_features, r, *([1] * len(kernel)))
        elif site.kind == "embedding":
            a_shape, b_shape = (r, site.in_features), (site.out_features, r)
        else:
            a_shape, b_shape = (r, site.in_features), (site.out_features, r)
        self.A = nn.Parameter(torch.empty(a_shape, **factory))
        self.B = nn.Parameter(torch.empty(b_shape, **factory))
        self.scale = config.scale_at(site.path)
        self.kind = site.kind
        if config.gate:  # input-dependent, so a gated update cannot be folded into W
            self.gate = nn.Parameter(torch.zeros(1, site.in_features, **factory))
            self.gate_bias = nn.Parameter(torch.zeros(1, **factory))
            self.foldable = False
        self.reset_parameters(config.init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        if self.A.is_meta:
            return
        if self.kind == "embedding":  # as HF PEFT: A zero, B normal, so the update starts at zero
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
        elif init == "gaussian":
            nn.init.normal_(self.A, std=1 / self.A.shape[0])
            nn.init.zeros_(self.B)
        else:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.zeros_(self.B)

    def delta_weight(self) -> torch.Tensor:
        """s * B A, in the base weight's [out, in, ...] layout."""
        if self.kind == "conv":
            a = self.A.flatten(1)
            b = self.B.flatten(1)
            return (b @ a).view(self.B.shape[0], *self.A.shape[1:]) * self.scale
        if self.kind == "embedding":
            return (self.B @ self.A).T * self.scale  # [num_embeddings, dim]
        return (self.B @ self.A) * self.scale


def insert_lora(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add s * B(A(dropout(x))) to the output of every targeted linear, conv or embedding op."""
    config: LoraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",) if config.gate else ("linear", "conv", "embedding"))
    check_one_rewrite_per_weight(gm, ctx, sites)
    return rewrite_sites(gm, ctx, sites, lambda site, weight: LoraWeights(site, weight, config),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: LoraConfig) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_lora")
    a = ins.get_attr(adapters.target(site.path, ctx.slot, "A"))
    b = ins.get_attr(adapters.target(site.path, ctx.slot, "B"))
    x = node.args[site.input_index]
    if site.kind == "embedding":
        delta = ins.call(aten.matmul.default, ins.call(aten.embedding.default, ins.call(aten.t.default, a), x),
                         ins.call(aten.t.default, b))
    else:
        x = maybe_dropout(ins, x, config.dropout)
        if site.kind == "conv":
            stride, padding, dilation = conv_geometry(node)
            hidden = ins.call(aten.convolution.default, x, a, None, stride, padding, dilation, False, [0], 1)
            delta = ins.call(aten.convolution.default, hidden, b, None, [1], [0], [1], False, [0], 1)
        else:
            delta = ins.call(aten.linear.default, ins.call(aten.linear.default, x, a), b)
    if config.gate:
        w, bias = (ins.get_attr(adapters.target(site.path, ctx.slot, n)) for n in ("gate", "gate_bias"))
        gate = ins.call(aten.linear.default, node.args[site.input_index], w, bias)
        delta = ins.call(aten.mul.Tensor, delta, ins.call(aten.sigmoid.default, gate))
    # add(y, delta, alpha=s) scales and adds in one pass over the output, where
    # HF PEFT's y + delta * s makes two; the numbers agree to float rounding.
    add_output(ins, node, delta, users, alpha=config.scale_at(site.path))

"""insert_lora: add a low-rank update beside each targeted weight op: y = W x + s * B (A dropout(x))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc import adapters
from peftc.fields import boolean, one_of, optional_pattern_list, pattern_list, positive_int, positive_number, probability
from peftc.graph_edit import Inserter, redirect_users
from peftc.pipeline import PassContext, PassResult
from peftc.sites import Site

from ._site_selection import select_sites

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

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoraWeights(nn.Module):
    """A (r x in[, kernel]) and B (out x r[, 1...]), laid out as HF PEFT's lora_A / lora_B weights."""

    def __init__(self, site: Site, weight: torch.Tensor, config: LoraConfig):
        super().__init__()
        r = config.r
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
        self.scale = config.scale
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
    nodes = {n.name: n for n in gm.graph.nodes}
    result = PassResult(modified=False)
    for site in sites:
        weight = ctx.base_params[site.param]
        module, created = adapters.get_or_create(
            ctx.adapter_root, site.path, ctx.slot, lambda: LoraWeights(site, weight, config))
        _rewrite_site(gm, nodes[site.node], site, ctx, config)
        result.modified = True
        result.sites.append(site.path)
        if created:
            for name, p in module.named_parameters():
                result.params_added[adapters.target(site.path, ctx.slot, name)[len(adapters.ROOT) + 1:]] = p.numel()
    return result


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: LoraConfig) -> None:
    users = list(node.users)
    tag = {"pass": "insert_lora", "method": "lora", "site": site.path, "slot": ctx.slot,
           "entry": ctx.entry_index}
    ins = Inserter(gm, node, tag)
    a = ins.get_attr(adapters.target(site.path, ctx.slot, "A"))
    b = ins.get_attr(adapters.target(site.path, ctx.slot, "B"))
    x = node.args[site.input_index]
    if site.kind == "embedding":
        delta = ins.call(aten.matmul.default, ins.call(aten.embedding.default, ins.call(aten.t.default, a), x),
                         ins.call(aten.t.default, b))
    else:
        if config.dropout > 0:
            x = ins.call(aten.dropout.default, x, config.dropout, True)
        if site.kind == "conv":
            stride, padding, dilation = _conv_geometry(node)
            hidden = ins.call(aten.convolution.default, x, a, None, stride, padding, dilation, False, [0], 1)
            delta = ins.call(aten.convolution.default, hidden, b, None, [1], [0], [1], False, [0], 1)
        else:
            delta = ins.call(aten.linear.default, ins.call(aten.linear.default, x, a), b)
    scaled = ins.call(aten.mul.Tensor, delta, config.scale)
    if config.gate:
        w, bias = (ins.get_attr(adapters.target(site.path, ctx.slot, n)) for n in ("gate", "gate_bias"))
        gate = ins.call(aten.linear.default, node.args[site.input_index], w, bias)
        scaled = ins.call(aten.mul.Tensor, scaled, ins.call(aten.sigmoid.default, gate))
    out = ins.call(aten.add.Tensor, node, scaled)
    out.meta["peftc"]["role"] = "output"
    redirect_users(users, node, out)


def _conv_geometry(node) -> tuple[list, list, list]:
    """stride, padding, dilation of a conv node, as lists (aten.convolution's form)."""
    if node.target == aten.convolution.default:
        return list(node.args[3]), list(node.args[4]), list(node.args[5])
    dims = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}[node.target]
    args = list(node.args) + [None] * (7 - len(node.args))
    stride = args[3] if args[3] is not None else [1] * dims
    padding = args[4] if args[4] is not None else [0] * dims
    dilation = args[5] if args[5] is not None else [1] * dims
    if isinstance(padding, str):
        raise NotImplementedError("string padding ('same'/'valid') on a LoRA conv site")
    return list(stride), list(padding), list(dilation)

"""insert_loha: add a Hadamard product of two low-rank pairs: y = W x + op(x, s·(W1a W1b) ⊙ (W2a W2b))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import boolean, probability
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._low_rank import LowRankConfig
from ._lycoris import add_lycoris_updates, cp_weight, cp_weight_node, effective_conv
from ._weight_ops import out_in_shape

aten = torch.ops.aten


@dataclass(frozen=True)
class LohaConfig(LowRankConfig):
    """LoHa (FedPara, Hyeon-Woo et al., 2022) as HF PEFT's LoHa; `dropout` drops the op's input."""

    method = "loha"
    # LyCORIS' dropouts in training (PEFT's): rows of ΔW dropped (kept ones rescaled), or the whole update
    rank_dropout: float = field(default=0.0, metadata={"check": probability})
    module_dropout: float = field(default=0.0, metadata={"check": probability})
    # On a Conv1d/2d with a kernel > 1: W1, W2 as CP (Tucker) products t ×₁ w_a ×₂ w_b (PEFT's hada_t1/t2)
    use_effective_conv2d: bool = field(default=False, metadata={"check": boolean})


class LohaWeights(nn.Module):
    """hada_w1_a, hada_w2_a (out x r) and hada_w1_b, hada_w2_b (r x in·kernel), named and shaped as HF PEFT's."""

    def __init__(self, site: Site, weight: torch.Tensor, config: LohaConfig):
        super().__init__()
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.shape = out_in_shape(weight, site)
        out_dim, in_dim, r = self.shape[0], math.prod(self.shape[1:]), config.r
        self.cp = effective_conv(site, self.shape, config.use_effective_conv2d)
        if self.cp:  # t [r, r, k1, k2] (k2 = 1 on a Conv1d), w_a [r, out], w_b [r, in]
            kernel = (*self.shape[2:], 1)[:2]
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *kernel, **factory))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *kernel, **factory))
            a_shape, b_shape = (r, out_dim), (r, self.shape[1])
        else:
            a_shape, b_shape = (out_dim, r), (r, in_dim)
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape, **factory))
        self.scale = config.scale
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.hada_w1_a.is_meta:
            return
        for name, p in self.named_parameters():  # as HF PEFT: the update starts at zero
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self) -> torch.Tensor:
        """s·(W1a W1b) ⊙ (W2a W2b), shaped [out, in, *kernel]."""
        if self.cp:
            hadamard = cp_weight(self.hada_t1, self.hada_w1_a, self.hada_w1_b) * cp_weight(
                self.hada_t2, self.hada_w2_a, self.hada_w2_b)
        else:
            hadamard = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return (hadamard * self.scale).reshape(self.shape)


def insert_loha(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add op(x, s·(W1a W1b) ⊙ (W2a W2b)) to the output of every targeted linear or conv op."""
    config: LohaConfig = ctx.entry
    return add_lycoris_updates(gm, ctx, lambda site, weight: LohaWeights(site, weight, config), _hadamard_graph,
                               "insert_loha")


def _hadamard_graph(ins: Inserter, attr, module: LohaWeights) -> Node:
    """(W1a W1b) ⊙ (W2a W2b), each pair a CP product with its core on an effective conv."""
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") + (("hada_t1", "hada_t2") if module.cp else ())
    w = {name: attr(name) for name in names}
    if module.cp:
        first = cp_weight_node(ins, w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
        second = cp_weight_node(ins, w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
    else:
        first = ins.call(aten.mm.default, w["hada_w1_a"], w["hada_w1_b"])
        second = ins.call(aten.mm.default, w["hada_w2_a"], w["hada_w2_b"])
    return ins.call(aten.mul.Tensor, first, second)

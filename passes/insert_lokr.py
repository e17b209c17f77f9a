"""insert_lokr: add a Kronecker-product update: y = W x + op(x, s·kron(W1, W2a W2b))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import boolean, fail, probability
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._low_rank import LowRankConfig
from ._lycoris import add_lycoris_updates, cp_weight, cp_weight_node, effective_conv
from ._weight_ops import out_in_shape

aten = torch.ops.aten


@dataclass(frozen=True)
class LokrConfig(LowRankConfig):
    """LoKr (Edalati et al., 2022; LyCORIS) as HF PEFT's LoKr; `dropout` drops the op's input.

    `decompose_both`: W1 is low-rank too (W1a W1b) where r < max(W1's dims) / 2; `decompose_factor`:
    factor each dimension as (factor, dim / factor) where it divides, -1 near the square root (PEFT's)."""

    method = "lokr"
    decompose_both: bool = field(default=False, metadata={"check": boolean})
    decompose_factor: int = field(default=-1, metadata={"check": lambda v, path: _factor(v, path)})
    # LyCORIS' dropouts in training (PEFT's): rows of ΔW dropped (rescaled with rank_dropout_scale), or
    # the whole update
    rank_dropout: float = field(default=0.0, metadata={"check": probability})
    module_dropout: float = field(default=0.0, metadata={"check": probability})
    rank_dropout_scale: bool = field(default=False, metadata={"check": boolean})
    # On a Conv1d/2d with a kernel > 1 and a low-rank W2: W2 = t2 ×₁ w2_a ×₂ w2_b (PEFT's lokr_t2)
    use_effective_conv2d: bool = field(default=False, metadata={"check": boolean})


def _factor(value, path: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not (value == -1 or value > 0):
        raise fail(path, "-1 (near the square root) or a positive integer", value)
    return value


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m·n = dimension: (factor, dimension / factor) when factor divides it, else m <= n with
    m as large as divisors, `factor` and the first pair's sum allow (HF PEFT / LyCORIS rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    length = m + n  # LyCORIS compares with the first pair's sum; kept for identical shapes
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LokrWeights(nn.Module):
    """lokr_w1 (out_l x in_m) and lokr_w2 (out_k x in_n·kernel), the latter as lokr_w2_a @ lokr_w2_b when
    r < max(out_k, in_n) / 2, the former as lokr_w1_a @ lokr_w1_b with decompose_both when
    r < max(out_l, in_m) / 2, exactly as HF PEFT decides."""

    def __init__(self, site: Site, weight: torch.Tensor, config: LokrConfig):
        super().__init__()
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.shape = out_in_shape(weight, site)
        factor = config.decompose_factor
        (out_l, out_k), (in_m, in_n) = factorization(self.shape[0], factor), factorization(self.shape[1], factor)
        kernel = self.shape[2:]
        self.w1_shape = (out_l, in_m)
        if config.decompose_both and config.r < max(out_l, in_m) / 2:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, config.r, **factory))
            self.lokr_w1_b = nn.Parameter(torch.empty(config.r, in_m, **factory))
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m, **factory))
        self.cp = config.r < max(out_k, in_n) / 2 and effective_conv(site, self.shape, config.use_effective_conv2d)
        if self.cp:  # t2 [r, r, k1, k2] (k2 = 1 on a Conv1d), w2_a [r, out_k], w2_b [r, in_n]
            self.lokr_t2 = nn.Parameter(torch.empty(config.r, config.r, *(*kernel, 1)[:2], **factory))
            self.lokr_w2_a = nn.Parameter(torch.empty(config.r, out_k, **factory))
            self.lokr_w2_b = nn.Parameter(torch.empty(config.r, in_n, **factory))
        elif config.r < max(out_k, in_n) / 2:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, config.r, **factory))
            self.lokr_w2_b = nn.Parameter(torch.empty(config.r, in_n * math.prod(kernel), **factory))
        else:
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *kernel, **factory))
        self.scale = config.scale
        self.reset_parameters()

    @property
    def low_rank(self) -> bool:
        return "lokr_w2_a" in self._parameters

    @property
    def w1_low_rank(self) -> bool:
        return "lokr_w1_a" in self._parameters

    def w1(self) -> torch.Tensor:
        return self.lokr_w1_a @ self.lokr_w1_b if self.w1_low_rank else self.lokr_w1

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if next(self.parameters()).is_meta:
            return
        zero = "lokr_w1_a" if self.w1_low_rank else "lokr_w1"
        for name, p in self.named_parameters():
            if name == zero:
                nn.init.zeros_(p)  # as HF PEFT: the update starts at zero
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    @property
    def kron_3d(self) -> bool:
        """A Conv1d's full lokr_w2 [b, d, k]: HF PEFT takes kron(W1, W2) of the 2-D W1 and the 3-D W2 as
        torch.kron does (W1 as [1, a, c], giving [b, a·d, c·k]) and reshapes that to [out, in, k]. Other
        layouts come out as kron(W1, W2 flattened to [b, d·k])."""
        return not self.low_rank and self.lokr_w2.dim() == 3

    def delta_weight(self) -> torch.Tensor:
        """s·kron(W1, W2), shaped [out, in, *kernel]."""
        if self.kron_3d:
            return (torch.kron(self.w1(), self.lokr_w2) * self.scale).reshape(self.shape)
        if self.cp:
            w2 = cp_weight(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b).flatten(1)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b if self.low_rank else self.lokr_w2.flatten(1)
        return (torch.kron(self.w1(), w2) * self.scale).reshape(self.shape)


def insert_lokr(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add op(x, s·kron(W1, W2)) to the output of every targeted linear or conv op."""
    config: LokrConfig = ctx.entry
    return add_lycoris_updates(gm, ctx, lambda site, weight: LokrWeights(site, weight, config), _kron_graph,
                               "insert_lokr")


def _kron_graph(ins: Inserter, attr, module: LokrWeights) -> Node:
    """kron(W1, W2), W1 and W2 each full, low-rank, or (W2 on an effective conv) a CP product."""
    w1 = ins.call(aten.mm.default, attr("lokr_w1_a"), attr("lokr_w1_b")) if module.w1_low_rank else attr("lokr_w1")
    if module.kron_3d:
        w2 = attr("lokr_w2")
    elif module.cp:  # [b, d, k1, k2] flattened to [b, d·k1·k2]: kron as for a full W2
        w2 = cp_weight_node(ins, attr("lokr_t2"), attr("lokr_w2_a"), attr("lokr_w2_b"))
        w2 = ins.call(aten.reshape.default, w2, [module.lokr_w2_a.shape[1], -1])
    elif module.low_rank:
        w2 = ins.call(aten.mm.default, attr("lokr_w2_a"), attr("lokr_w2_b"))
    else:
        w2 = ins.call(aten.view.default, attr("lokr_w2"), [module.lokr_w2.shape[0], -1])
    return _kron(ins, w1, w2, module)


def _kron(ins: Inserter, w1, w2, module: LokrWeights):
    """kron(W1 [a, c], W2 [b, d]) = (W1[:, None, :, None] · W2[None, :, None, :]).view(a·b, c·d), in plain ops."""
    (a, c) = module.w1_shape
    b = module.lokr_w2_a.shape[1] if module.cp else (module.lokr_w2_a if module.low_rank else module.lokr_w2).shape[0]
    if module.kron_3d:  # W1 [1, a, c] (x) W2 [b, d, k] -> [b, a·d, c·k]
        _, d, k = module.lokr_w2.shape
        outer = ins.call(aten.mul.Tensor, ins.call(aten.view.default, w1, [1, a, 1, c, 1]),
                         ins.call(aten.view.default, w2, [b, 1, d, 1, k]))
        return ins.call(aten.view.default, outer, [b, a * d, c * k])
    d = math.prod(module.shape[1:]) // c
    outer = ins.call(aten.mul.Tensor, ins.call(aten.view.default, w1, [a, 1, c, 1]),
                     ins.call(aten.view.default, w2, [1, b, 1, d]))
    return ins.call(aten.view.default, outer, [a * b, c * d])

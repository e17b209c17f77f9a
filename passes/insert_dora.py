"""insert_dora: weight-decomposed LoRA: y = b + (m / ||W + s·BA||) · (W x + s·B A x), the norm detached.

On a conv, ||·|| is per output channel over [in, *kernel] and B A is LoRA's conv pair (as PEFT's DoRA conv).
On an embedding [num, dim], ||·|| is per embedding dimension (over the vocabulary) and the update is
s·A^T[ids] B^T, as PEFT's DoRA embedding (no dropout: the input is token ids)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.errors import SpecError
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
    apply_site_op,
    bias_node,
    conv_geometry,
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
        kernel = tuple(weight.shape[2:]) if site.kind == "conv" else ()
        self.A = nn.Parameter(torch.empty(config.r, site.in_features, *kernel, **factory))
        self.B = nn.Parameter(torch.zeros(site.out_features, config.r, *[1] * len(kernel), **factory))
        self.kernel_dims = len(kernel)  # > 0: a conv; the magnitude is PEFT's [1, out, 1, ...] there
        self.embedding = site.kind == "embedding"
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

    def low_rank_weight(self) -> torch.Tensor:
        """B A as a weight of the site's [out, in, *kernel] shape (an embedding's [num, dim])."""
        if self.embedding:
            return (self.B @ self.A).T
        return (self.B.flatten(1) @ self.A.flatten(1)).view(self.B.shape[0], *self.A.shape[1:])

    def weight_norm(self, weight_out_in: torch.Tensor) -> torch.Tensor:
        """||W + s·BA|| per output row (per output channel of a conv, per column of an embedding):
        HF PEFT's column norm of [in, out]."""
        full = weight_out_in + self.scale * self.low_rank_weight()
        return torch.linalg.vector_norm(full, dim=0 if self.embedding else tuple(range(1, full.dim())))


def fold_dora(module: DoraWeights, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """(m / ||W + s·BA||) · (W + s·BA), row-wise, in the parameter's layout."""
    full = flip_layout(weight, site) + module.scale * module.low_rank_weight()
    factor = module.magnitude / module.weight_norm(flip_layout(weight, site))
    scaled = factor * full if module.embedding else factor.view(-1, *[1] * (full.dim() - 1)) * full
    return flip_layout(scaled, site).to(weight.dtype)


def insert_dora(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Rescale every targeted linear op's output by m/||W + s·BA|| and add the scaled low-rank update."""
    config: DoraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear", "conv", "embedding"))
    for site in sites:
        if site.kind == "conv" and site.in_features != ctx.base_params[site.param].shape[1]:
            raise SpecError(f"adapters[{ctx.entry_index}].targets: DoRA cannot act on the grouped conv at "
                            f"{site.path!r} (PEFT's DoRA cannot either); exclude it or use lora")
    check_one_rewrite_per_weight(gm, ctx, sites)
    return rewrite_sites(gm, ctx, sites, lambda site, weight: DoraWeights(site, weight, config),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))


def _rewrite_embedding(ins: Inserter, node, site: Site, config: DoraConfig, a, b, magnitude, users) -> None:
    """(m / ||W + s·(BA)^T||_cols) ⊙ (W[ids] + s·A^T[ids] B^T), as PEFT's DoRA embedding."""
    weight = ins.get_attr(site.param)
    low_rank = ins.call(aten.t.default, ins.call(aten.mm.default, b, a))  # [num, dim]
    full = ins.call(aten.add.Tensor, weight, ins.call(aten.mul.Tensor, low_rank, config.scale))
    norm = ins.call(aten.linalg_vector_norm.default, full, 2, [0])
    factor = ins.call(aten.div.Tensor, magnitude, ins.call(aten.detach.default, norm))
    ids = node.args[site.input_index]
    lora = ins.call(aten.matmul.default, ins.call(aten.embedding.default, ins.call(aten.t.default, a), ids),
                    ins.call(aten.t.default, b))
    delta = ins.call(aten.add.Tensor,
                     ins.call(aten.mul.Tensor, ins.call(aten.sub.Tensor, factor, 1), node),
                     ins.call(aten.mul.Tensor, ins.call(aten.mul.Tensor, factor, lora), config.scale))
    add_output(ins, node, delta, users)


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: DoraConfig) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_dora")
    a = ins.get_attr(adapters.target(site.path, ctx.slot, "A"))
    b = ins.get_attr(adapters.target(site.path, ctx.slot, "B"))
    magnitude = ins.get_attr(adapters.target(site.path, ctx.slot, "magnitude"))
    if site.kind == "embedding":
        return _rewrite_embedding(ins, node, site, config, a, b, magnitude, users)
    weight = weight_out_in(ins, site)
    x = maybe_dropout(ins, node.args[site.input_index], config.dropout)
    kernel_dims = len(ins.gm.get_parameter(site.param).shape) - 2 if site.kind == "conv" else 0
    # m / ||W + s·BA||, with the norm detached (DoRA section 4.3, as HF PEFT does)
    low_rank = ins.call(aten.mm.default, *(ins.call(aten.view.default, t, [n, -1]) for t, n in
                                           ((b, site.out_features), (a, config.r))))
    if kernel_dims:
        low_rank = ins.call(aten.view.default, low_rank, list(ins.gm.get_parameter(site.param).shape))
    full = ins.call(aten.add.Tensor, weight, ins.call(aten.mul.Tensor, low_rank, config.scale))
    norm = ins.call(aten.linalg_vector_norm.default, full, 2, list(range(1, kernel_dims + 2)))
    factor = ins.call(aten.div.Tensor, magnitude, ins.call(aten.detach.default, norm))
    if kernel_dims:  # per output channel: [out, 1, ...] against [batch, out, *spatial]
        factor = ins.call(aten.view.default, factor, [-1] + [1] * kernel_dims)
        stride, padding, dilation = conv_geometry(node)
        hidden = ins.call(aten.convolution.default, x, a, None, stride, padding, dilation, False,
                          [0] * len(stride), 1)
        ones = [1] * len(stride)
        lora = ins.call(aten.convolution.default, hidden, b, None, ones, [0] * len(stride), ones, False,
                        [0] * len(stride), 1)
    else:
        lora = ins.call(aten.linear.default, ins.call(aten.linear.default, x, a), b)
    base = _base_without_bias(ins, node, site, x, weight, config)
    delta = ins.call(aten.add.Tensor,
                     ins.call(aten.mul.Tensor, ins.call(aten.sub.Tensor, factor, 1), base),
                     ins.call(aten.mul.Tensor, ins.call(aten.mul.Tensor, factor, lora), config.scale))
    add_output(ins, node, delta, users)


def _base_without_bias(ins: Inserter, node, site: Site, x, weight, config: DoraConfig):
    """W x: the site's output minus its bias; with dropout, W applied to the dropped input (as HF PEFT)."""
    if config.dropout > 0:
        return apply_site_op(ins, node, site, x, weight)
    bias = bias_node(node, site)
    if bias is not None and site.kind == "conv":  # [out] against [batch, out, *spatial]
        bias = ins.call(aten.view.default, bias, [-1] + [1] * (len(node.meta["val"].shape) - 2))
    return node if bias is None else ins.call(aten.sub.Tensor, node, bias)

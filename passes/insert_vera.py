"""insert_vera: add a vector-scaled shared random projection: y = W x + λb ⊙ B(λd ⊙ A x)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import (
    finite_number,
    non_negative_int,
    optional_pattern_list,
    pattern_list,
    positive_int,
    probability,
)
from peftc.ir import adapters
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import in_adapter_dtype, rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import add_output, maybe_dropout

aten = torch.ops.aten


@dataclass(frozen=True)
class VeraConfig:
    """VeRA (Kopiczko et al., 2024) as HF PEFT's VeRA; `seed` is its projection_prng_key."""

    method = "vera"
    targets: tuple = field(metadata={"check": pattern_list})
    r: int = field(default=256, metadata={"check": positive_int})
    seed: int = field(default=0, metadata={"check": non_negative_int})
    dropout: float = field(default=0.0, metadata={"check": probability})
    d_initial: float = field(default=0.1, metadata={"check": finite_number})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


class VeraProjections(nn.Module):
    """The frozen A (r x max in) and B (max out x r) every site of one entry slices, drawn from `seed`.

    Non-persistent buffers: the seed regenerates them, so checkpoints hold only the trained vectors
    (HF PEFT's save_projection=False)."""

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, like: torch.Tensor):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        a = _kaiming_uniform(torch.empty(r, max_in), generator)  # same draw order as HF PEFT
        b = _kaiming_uniform(torch.empty(max_out, r), generator)
        self.register_buffer("A", a.to(device=like.device, dtype=like.dtype), persistent=False)
        self.register_buffer("B", b.to(device=like.device, dtype=like.dtype), persistent=False)


def _kaiming_uniform(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(tensor.shape[1])  # gain sqrt(2), fan_in
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


class VeraWeights(nn.Module):
    """lambda_b (out) and lambda_d (r): HF PEFT's vera_lambda_b / vera_lambda_d, the only trained tensors."""

    def __init__(self, site: Site, weight: torch.Tensor, config: VeraConfig, projections: VeraProjections):
        super().__init__()
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.lambda_b = nn.Parameter(torch.zeros(site.out_features, **factory))
        self.lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), **factory))
        object.__setattr__(self, "projections", projections)  # shared, owned by the entry's slot
        self.in_features, self.out_features = site.in_features, site.out_features

    def delta_weight(self) -> torch.Tensor:
        """(λb ⊙ B[:out]) (λd ⊙ A[:, :in]), shaped [out, in]."""
        a = self.projections.A[:, : self.in_features]
        b = self.projections.B[: self.out_features, :]
        return (self.lambda_b[:, None] * b) @ (self.lambda_d[:, None] * a)


def insert_vera(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Add λb ⊙ B(λd ⊙ A dropout(x)) to the output of every targeted linear op; A and B shared and frozen."""
    config: VeraConfig = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear",))
    check_one_rewrite_per_weight(gm, ctx, sites)
    first_weight = ctx.base_params[sites[0].param]
    shape = (config.r, max(s.in_features for s in sites), max(s.out_features for s in sites))
    projections, _ = adapters.get_or_create(ctx.adapter_root, "", ctx.slot, lambda: in_adapter_dtype(
        ctx, VeraProjections(*shape, config.seed, first_weight), first_weight))
    return rewrite_sites(gm, ctx, sites, lambda site, weight: VeraWeights(site, weight, config, projections),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, config))


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, config: VeraConfig) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, "insert_vera")
    a = ins.call(aten.slice.Tensor, ins.get_attr(adapters.target("", ctx.slot, "A")), 1, 0, site.in_features)
    b = ins.call(aten.slice.Tensor, ins.get_attr(adapters.target("", ctx.slot, "B")), 0, 0, site.out_features)
    lambda_d = ins.get_attr(adapters.target(site.path, ctx.slot, "lambda_d"))
    lambda_b = ins.get_attr(adapters.target(site.path, ctx.slot, "lambda_b"))
    x = maybe_dropout(ins, node.args[site.input_index], config.dropout)
    hidden = ins.call(aten.mul.Tensor, lambda_d, ins.call(aten.linear.default, x, a))
    delta = ins.call(aten.mul.Tensor, lambda_b, ins.call(aten.linear.default, hidden, b))
    add_output(ins, node, delta, users)

"""insert_ia3: scale a site's output (or, for `feedforward` sites, its input) by a learned vector.

On a conv the vector scales channels (PEFT's ia3_l is [1, C, 1, ...]; peftc's is flat)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.core.fields import optional_pattern_list, pattern_list
from peftc.core.targets import matches_any
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import rewrite_sites
from ._site_selection import select_sites
from ._weight_ops import flip_layout

aten = torch.ops.aten


@dataclass(frozen=True)
class Ia3Config:
    """(IA)^3 (Liu et al., 2022) as HF PEFT's IA3: `feedforward` is the subset of targets whose input is scaled."""

    method = "ia3"
    targets: tuple = field(metadata={"check": pattern_list})
    feedforward: tuple = field(default=(), metadata={"check": optional_pattern_list})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


class Ia3Weights(nn.Module):
    """l: one factor per output feature, or per input feature on a feedforward site (HF PEFT's ia3_l, flattened)."""

    def __init__(self, site: Site, weight: torch.Tensor, feedforward: bool):
        super().__init__()
        size = site.in_features if feedforward else site.out_features
        self.l = nn.Parameter(torch.ones(size, device=weight.device, dtype=weight.dtype))
        self.feedforward = feedforward
        self.kernel_dims = weight.dim() - 2 if site.kind == "conv" else 0  # spatial dims the vector broadcasts over
        self.groups = site.in_features // weight.shape[1] if site.kind == "conv" else 1


def fold_ia3(module: Ia3Weights, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """W·diag(l) on a feedforward site, diag(l)·W elsewhere (in [out, in] terms)."""
    if module.kernel_dims:
        return (weight * _conv_weight_factor(module, weight)).to(weight.dtype)
    factor = module.l[None, :] if module.feedforward else module.l[:, None]
    return flip_layout(flip_layout(weight, site) * factor, site).to(weight.dtype)


def _conv_weight_factor(module: Ia3Weights, weight: torch.Tensor) -> torch.Tensor:
    """l as a factor of a conv weight [out, in / groups, *kernel]: per output channel, or per input
    channel of each output channel's group."""
    out, in_per_group = weight.shape[:2]
    ones = [1] * module.kernel_dims
    if not module.feedforward:
        return module.l.view(out, 1, *ones)
    g = module.groups
    factor = module.l.view(g, 1, in_per_group).expand(g, out // g, in_per_group)
    return factor.reshape(out, in_per_group, *ones)


def fold_ia3_bias(module: Ia3Weights, site: Site, bias: torch.Tensor) -> torch.Tensor:
    """The output scaling scales the bias too; an input scaling leaves it alone."""
    return bias if module.feedforward else (bias * module.l).to(bias.dtype)


def insert_ia3(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Multiply every targeted linear or conv op's output by l, or its input for the `feedforward` subset."""
    config: Ia3Config = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear", "conv"))
    check_one_rewrite_per_weight(gm, ctx, sites)
    feedforward = _feedforward_paths(ctx, config, sites)
    return rewrite_sites(gm, ctx, sites, lambda site, weight: Ia3Weights(site, weight, site.path in feedforward),
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, module))


def _feedforward_paths(ctx: PassContext, config: Ia3Config, sites: list[Site]) -> set[str]:
    """Paths of the targeted sites that `feedforward` names; each of its patterns must name one."""
    for i, pattern in enumerate(config.feedforward):
        if not any(matches_any([pattern], s.path) for s in sites):
            raise SpecError(
                f"adapters[{ctx.entry_index}].feedforward[{i}]: {pattern!r} matches none of the sites this entry's "
                f"targets select ({', '.join(repr(s.path) for s in sites[:3])}, ...); feedforward must be a subset "
                "of targets")
    return {s.path for s in sites if matches_any(config.feedforward, s.path)}


def _scale(ins: Inserter, module: Ia3Weights, l_target: str):
    """l as the op reads it: flat for a linear op, [C, 1, ...] over a conv's channel dim."""
    l = ins.get_attr(l_target)
    if module.kernel_dims:
        l = ins.call(aten.view.default, l, [-1] + [1] * module.kernel_dims)
    return l


def _rewrite_site(gm: GraphModule, node, site: Site, ctx: PassContext, module: Ia3Weights) -> None:
    tag = {"pass": "insert_ia3", "method": "ia3", "site": site.path, "slot": ctx.slot, "entry": ctx.entry_index}
    l_target = adapters.target(site.path, ctx.slot, "l")
    if module.feedforward:  # scale the input just before the op
        x = node.args[site.input_index]
        ins = Inserter(gm, node.prev, tag)
        ins.module_stack = node.meta.get("nn_module_stack")
        scaled = ins.call(aten.mul.Tensor, x, _scale(ins, module, l_target))
        scaled.meta["peftc"]["role"] = "output"
        node.update_arg(site.input_index, scaled)
        return
    users = list(node.users)
    ins = Inserter(gm, node, tag)
    out = ins.call(aten.mul.Tensor, node, _scale(ins, module, l_target))
    out.meta["peftc"]["role"] = "output"
    redirect_users(users, node, out)

"""Methods that rewrite a weight as a function of itself, W' = f(W) (OFT, BOFT, HRA: W' = W·Rᵀ).

Their weights module maps the site's weight, flattened to [out, in·kernel] (the rows a
rotation of the input space acts on), to the new weight: `module(weight, training)`.
`training` is None when merging, else a 0-d tensor that is 1 in train mode and 0 in eval,
for methods whose dropout replaces random blocks by the identity (a graph node whose value
`eval()` flips, as peftc.ir.modes does for dropout).

In the graph the site computes y + op(x, f(W) − W), so the adapter's output node is the
`add` merge looks for; merging writes f(W) into the weight.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.ir.graph_edit import Inserter
from peftc.ir.modes import MODE_KEY, ModeArg
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import MakeWeights, rewrite_sites, site_inserter
from ._traced import inline_module
from ._weight_ops import add_delta_op, flip_layout, out_in_shape, weight_out_in

aten = torch.ops.aten


def flat_in_features(site: Site, weight: torch.Tensor) -> int:
    """The dimension the rotation acts on: in_features, times the kernel size for a conv."""
    return math.prod(out_in_shape(weight, site)[1:])


def transform_sites(gm: GraphModule, ctx: PassContext, sites: list[Site], make_weights: MakeWeights,
                    pass_name: str) -> PassResult:
    check_one_rewrite_per_weight(gm, ctx, sites)
    return rewrite_sites(gm, ctx, sites, make_weights,
                         lambda gm, node, site, ctx, module: _rewrite_site(gm, node, site, ctx, module, pass_name))


def fold_transform(module: nn.Module, site: Site, weight: torch.Tensor) -> torch.Tensor:
    """f(W), in the parameter's own layout and dtype."""
    shape = out_in_shape(weight, site)
    flat = flip_layout(weight, site).reshape(shape[0], -1)
    new = module(flat.to(_dtype(module)), None).reshape(shape)
    return flip_layout(new, site).to(weight.dtype)


def _rewrite_site(gm: GraphModule, node: Node, site: Site, ctx: PassContext, module: nn.Module,
                  pass_name: str) -> None:
    users = list(node.users)
    ins = site_inserter(gm, node, site, ctx, pass_name)
    shape = out_in_shape(ctx.base_params[site.param], site)
    flat = ins.call(aten.view.default, weight_out_in(ins, site), [shape[0], math.prod(shape[1:])])
    param = next(module.parameters())
    example = torch.empty(shape[0], math.prod(shape[1:]), dtype=param.dtype, device=param.device)
    flag = _training_flag(ins, param.dtype)
    new = inline_module(ins, ctx, site, module, [flat, flag], [example, torch.ones((), dtype=param.dtype)])
    if not flag.users:  # the method has no train-only behaviour (no dropout)
        gm.graph.erase_node(flag)
    delta = ins.call(aten.view.default, ins.call(aten.sub.Tensor, new, flat), list(shape))
    add_delta_op(ins, node, site, node.args[site.input_index], delta, users)


def _training_flag(ins: Inserter, dtype: torch.dtype) -> Node:
    """A 0-d tensor, 1 in train mode and 0 in eval (graphs are captured in train mode)."""
    flag = ins.call(aten.scalar_tensor.default, 1.0, dtype=dtype)
    flag.meta[MODE_KEY] = ModeArg(index=0, name="s", train=1.0, eval=0.0)
    return flag


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype

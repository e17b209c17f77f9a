"""What LoHa and LoKr (LyCORIS' methods, as HF PEFT has them) share: the CP form of a conv weight, and the
pass body that adds op(dropout(x), s·ΔW) at every targeted linear or conv op with LyCORIS' dropouts."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._conflicts import check_one_rewrite_per_weight
from ._per_site import MakeWeights, rewrite_sites, site_inserter
from ._site_selection import select_sites
from ._weight_ops import add_dropped_delta_op, maybe_dropout

aten = torch.ops.aten
# (inserter, the adapter tensor of this site by name, its adapter module) -> ΔW before the scale s, [out, in·kernel]
DeltaGraph = Callable[[Inserter, Callable[[str], Node], nn.Module], Node]


def effective_conv(site: Site, shape: tuple, wanted: bool) -> bool:
    """PEFT's rule: the CP form on Conv1d/Conv2d only, and not for a kernel of ones."""
    return wanted and site.kind == "conv" and len(shape) in (3, 4) and math.prod(shape[2:]) > 1


def cp_weight(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """[out, in, k1, k2] = Σ t[i, j, k1, k2] w_a[i, out] w_b[j, in] (LyCORIS' make_weight_cp)."""
    return torch.einsum("ijkl,ip,jr->prkl", t, w_a, w_b)


def cp_weight_node(ins: Inserter, t: Node, w_a: Node, w_b: Node) -> Node:
    """cp_weight in the graph."""
    return ins.call(aten.einsum.default, "ijkl,ip,jr->prkl", [t, w_a, w_b])


def add_lycoris_updates(gm: GraphModule, ctx: PassContext, make_weights: MakeWeights, delta_graph: DeltaGraph,
                        pass_name: str) -> PassResult:
    """y + op(dropout(x), s·ΔW) at every targeted linear or conv op, ΔW built by `delta_graph` and shaped as the
    weight, with the entry's rank_dropout and module_dropout (add_dropped_delta_op)."""
    config = ctx.entry
    sites = select_sites(ctx, config, kinds=("linear", "conv"))
    check_one_rewrite_per_weight(gm, ctx, sites)

    def rewrite(gm: GraphModule, node: Node, site: Site, ctx: PassContext, module: nn.Module) -> None:
        users = list(node.users)
        ins = site_inserter(gm, node, site, ctx, pass_name)
        delta = delta_graph(ins, lambda name: ins.get_attr(adapters.target(site.path, ctx.slot, name)), module)
        delta = ins.call(aten.mul.Tensor, delta, config.scale)
        delta = ins.call(aten.view.default, delta, list(module.shape))
        x = maybe_dropout(ins, node.args[site.input_index], config.dropout)
        # LoHa has no rank_dropout_scale: PEFT's LoHa always rescales the kept rows
        add_dropped_delta_op(ins, node, site, x, delta, users, config.rank_dropout, config.module_dropout,
                             getattr(config, "rank_dropout_scale", True))

    return rewrite_sites(gm, ctx, sites, make_weights, rewrite)

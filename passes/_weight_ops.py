"""Graph helpers for weight-delta methods: a site's weight as [out, in], its bias, its op on another weight."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.sites import Site, conv_groups

aten = torch.ops.aten


def weight_out_in(ins: Inserter, site: Site) -> Node:
    """The site's weight as an [out, in] (or [out, in, *kernel]) node; GPT-2 Conv1D weights are transposed."""
    weight = ins.get_attr(site.param)
    return ins.call(aten.t.default, weight) if site.layout == "in_out" else weight


def flip_layout(tensor: torch.Tensor, site) -> torch.Tensor:
    """[(E,) out, in] <-> the parameter's own layout (GPT-2 Conv1D stores [in, out], some MoE experts
    [E, in, out]); its own inverse."""
    return tensor.transpose(-1, -2) if site.layout == "in_out" else tensor


def fold_delta(module, site, weight: torch.Tensor) -> torch.Tensor:
    """W + ΔW, for methods whose adapter module gives `delta_weight()` in the [out, in, ...] layout."""
    return add_in_wider_dtype(weight, flip_layout(module.delta_weight(), site))


def add_in_wider_dtype(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + ΔW in the wider of the two dtypes (a float32 update over a bfloat16 weight adds in float32),
    rounded once to W's dtype."""
    return (weight + delta).to(weight.dtype)


def bias_node(node: Node, site: Site) -> Node | None:
    """The bias argument of a linear or conv site op, or None."""
    if site.kind == "embedding" or node.target in (aten.mm.default, aten.matmul.default):
        return None
    if node.target == aten.addmm.default:
        return node.args[0]
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def bias_param(gm: GraphModule, site: Site) -> str | None:
    """FQN of the parameter the site op adds as its bias, or None."""
    node = next((n for n in gm.graph.nodes if n.name == site.node_name), None)
    bias = None if node is None else bias_node(node, site)
    return bias.target if isinstance(bias, Node) and bias.op == "get_attr" else None


def conv_geometry(node) -> tuple[list, list, list]:
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


def apply_site_op(ins: Inserter, node: Node, site: Site, x: Node, weight: Node) -> Node:
    """The site's own op (no bias) with `weight` ([out, in...]; embeddings: [num, dim]) in place of its weight."""
    if site.kind == "linear":
        return ins.call(aten.linear.default, x, weight)
    if site.kind == "embedding":
        return ins.call(aten.embedding.default, weight, x)
    stride, padding, dilation = conv_geometry(node)
    return ins.call(aten.convolution.default, x, weight, None, stride, padding, dilation, False,
                    [0] * len(stride), conv_groups(node))


def add_to_parameter(gm: GraphModule, site: Site, make_inserter, build_delta) -> None:
    """W + ΔW wherever the graph reads the site's parameter (for parameter sites: MoE experts).

    `make_inserter(anchor)` gives an Inserter after `anchor`; `build_delta(ins)` inserts ΔW in the
    parameter's own layout and returns (ΔW node, add kwargs). The add is the adapter's output
    node, so merge folds it as it folds any other; the parameter itself is never written.
    """
    def add(ins, weight):
        delta, add_kwargs = build_delta(ins)
        return ins.call(aten.add.Tensor, weight, delta, **add_kwargs)

    rewrite_parameter(gm, site, make_inserter, add)


def rewrite_parameter(gm: GraphModule, site: Site, make_inserter, build_weight) -> None:
    """Every read of the site's parameter W reads `build_weight(ins, W)` instead: a node whose first
    argument is W, tagged as the adapter's output (merge puts W back and folds the method)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for weight in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == site.param]:
        users = sorted(weight.users, key=order.__getitem__)
        if not users:
            continue
        ins = make_inserter(users[0].prev)  # just before the first read, in that op's module
        ins.module_stack = users[0].meta.get("nn_module_stack", ins.module_stack)
        new = build_weight(ins, weight)
        new.meta["peftc"]["role"] = "output"
        redirect_users(users, weight, new)


def maybe_dropout(ins: Inserter, x: Node, p: float) -> Node:
    return ins.call(aten.dropout.default, x, p, True) if p > 0 else x


def out_in_shape(weight: torch.Tensor, site: Site) -> tuple[int, ...]:
    """The weight's shape as [out, in, *kernel] (GPT-2 Conv1D's [in, out] reversed)."""
    return tuple(weight.shape[::-1]) if site.layout == "in_out" else tuple(weight.shape)


def add_output(ins: Inserter, y: Node, delta: Node, users: list[Node], **add_kwargs) -> Node:
    """add(y, delta) tagged as the adapter's output node (what merge and the lowerings look for),
    read by `users` (y's readers before the rewrite) instead of y."""
    out = ins.call(aten.add.Tensor, y, delta, **add_kwargs)
    out.meta["peftc"]["role"] = "output"
    redirect_users(users, y, out)
    return out


def keep_mask(ins: Inserter, like: Node, size: int, p: float) -> Node:
    """`size` ones, each zeroed with probability p in training (none in eval): dropout of ones, clamped to 1,
    so it follows train/eval as every dropout node does."""
    ones = ins.call(aten.new_ones.default, like, [size])
    return ins.call(aten.clamp_max.default, ins.call(aten.dropout.default, ones, p, True), 1.0)


def add_dropped_delta_op(ins: Inserter, node: Node, site: Site, x: Node, delta_weight: Node, users: list[Node],
                         rank_dropout: float, module_dropout: float, rescale_ranks: bool = True) -> Node:
    """add_delta_op with LyCORIS' dropouts, as HF PEFT's LoHa / LoKr: `rank_dropout` zeroes rows of ΔW
    (the rest divided by the kept fraction when `rescale_ranks`), `module_dropout` skips the whole update."""
    if rank_dropout:
        rows = keep_mask(ins, delta_weight, site.out_features, rank_dropout)
        if rescale_ranks:
            rows = ins.call(aten.div.Tensor, rows, ins.call(aten.mean.default, rows))
        ndim = len(delta_weight.meta["val"].shape)
        rows = ins.call(aten.view.default, rows, [-1] + [1] * (ndim - 1))
        delta_weight = ins.call(aten.mul.Tensor, delta_weight, rows)
    out = apply_site_op(ins, node, site, x, delta_weight)
    if module_dropout:
        out = ins.call(aten.mul.Tensor, out, keep_mask(ins, out, 1, module_dropout))
    return add_output(ins, node, out, users)


def add_delta_op(ins: Inserter, node: Node, site: Site, x: Node, delta_weight: Node, users: list[Node]) -> Node:
    """y + op(x, ΔW): the site's op on ΔW added to its output, tagged as the adapter's output node."""
    return add_output(ins, node, apply_site_op(ins, node, site, x, delta_weight), users)

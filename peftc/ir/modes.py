"""Train/eval mode for captured graphs.

torch.export bakes the module's mode into the graph. peftc captures in train mode and
records, on each mode-dependent node, which argument depends on the mode and its value in
each mode; switching mode rewrites that one argument in place and regenerates the code.
Only the scalar is recorded, never the node's inputs, so passes may rewire inputs freely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from peftc.ir.layer_program import program_bodies

aten = torch.ops.aten

DROPOUT_OPS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
               aten.feature_alpha_dropout.default)
MODE_KEY = "peftc_mode"


@dataclass(frozen=True)
class ModeArg:
    index: int  # positional index of the argument
    name: str  # its keyword name, if given by keyword
    train: Any
    eval: Any


def mode_arg(node: Node) -> ModeArg | None:
    """Which argument of `node` depends on train/eval mode, or None."""
    if node.op != "call_function":
        return None
    if node.target in DROPOUT_OPS:
        return _make(node, 2, "train", False)
    if node.target == aten.scaled_dot_product_attention.default:
        return _make(node, 4, "dropout_p", 0.0)
    if node.target == aten.batch_norm.default:
        return _make(node, 5, "training", False)
    if _is_batch_counter_update(node):
        return _make(node, 1, "other", 0)  # num_batches_tracked += 0 in eval
    return None


def _make(node: Node, index: int, name: str, eval_value: Any) -> ModeArg | None:
    current = _get(node, index, name)
    if current is None:
        return None
    return ModeArg(index, name, current, eval_value)


def _get(node: Node, index: int, name: str) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if index < len(node.args) else None


def _put(node: Node, arg: ModeArg, value: Any) -> bool:
    if _get(node, arg.index, arg.name) == value:
        return False
    if arg.name in node.kwargs:
        node.kwargs = {**node.kwargs, arg.name: value}
    else:
        args = list(node.args)
        args[arg.index] = value
        node.args = tuple(args)
    return True


def _is_batch_counter_update(node: Node) -> bool:
    first = node.args[0] if node.args else None
    return (
        node.target == aten.add_.Tensor
        and isinstance(first, Node)
        and first.op == "get_attr"
        and str(first.target).endswith("num_batches_tracked")
    )


def record_modes(gm: GraphModule) -> None:
    """Remember the mode-dependent argument of every node (captured in train mode)."""
    for node in gm.graph.nodes:
        if MODE_KEY not in node.meta:
            arg = mode_arg(node)
            if arg is not None:
                node.meta[MODE_KEY] = arg


def set_mode(gm: GraphModule, training: bool) -> bool:
    """Put every mode-dependent node in train or eval form, in `gm` and in the graphs outlined from it
    (peftc.ir.outline, and the layer programs of peftc.ir.layer_program); returns whether anything changed."""
    changed = False
    for graph_module in [m for m in gm.modules() if isinstance(m, GraphModule)] + program_bodies(gm):
        changed |= _set_graph_mode(graph_module, training)
    return changed


def _set_graph_mode(gm: GraphModule, training: bool) -> bool:
    record_modes(gm)
    changed = False
    for node in gm.graph.nodes:
        arg = node.meta.get(MODE_KEY)
        if arg is not None:
            changed |= _put(node, arg, arg.train if training else arg.eval)
    if changed:
        gm.recompile()
    return changed

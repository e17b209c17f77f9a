"""The torch graph to export: an eval-mode copy of a compiled graph, with LoRA scales moved out.

Exporting never changes the CompiledModel: the copy shares its parameters but owns its
graph, so flipping dropout to eval or editing nodes does not touch the model being trained.
"""

from __future__ import annotations

import copy
import numbers

import torch
from torch.fx import GraphModule

from peftc.capture.specialize import DerivedGuards
from peftc.ir.graph_edit import provenance
from peftc.ir.modes import set_mode

aten = torch.ops.aten


def eval_copy(gm: GraphModule) -> GraphModule:
    """A graph module sharing `gm`'s parameters, with its own graph, in eval mode."""
    copied = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    set_mode(copied, False)
    drop_derived_guards(copied)
    return copied


def drop_derived_guards(gm: GraphModule) -> None:
    """Remove the input guards of a graph derived from the superset capture (peftc.capture.specialize): they
    make stand-ins for the inputs the call leaves out with factory calls ONNX's trace cannot size, and
    they compute nothing the exported model returns (the trace checks its own example)."""
    for node in list(gm.graph.find_nodes(op="call_module")):
        if not node.users and isinstance(gm.get_submodule(str(node.target)), DerivedGuards):
            gm.graph.erase_node(node)
            gm.delete_submodule(str(node.target))
    gm.recompile()


def strip_lora_scales(gm: GraphModule) -> int:
    """Remove the scale from every LoRA branch; the adapter file carries scale·B instead.

    insert_lora adds the branch as add(y, delta, alpha=s) (older graphs: y + delta * s).
    With the scale outside the graph, one exported model runs adapters of any rank and alpha.
    Returns how many branches were changed.
    """
    stripped = 0
    for node in list(gm.graph.nodes):
        tag = provenance(node)
        if not tag or tag.get("method") != "lora":
            continue
        if node.target == aten.add.Tensor and tag.get("role") == "output" and "alpha" in node.kwargs:
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "alpha"}
            stripped += 1
        elif node.target == aten.mul.Tensor and isinstance(node.args[1], numbers.Number):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            stripped += 1
    if stripped:
        gm.recompile()
    return stripped

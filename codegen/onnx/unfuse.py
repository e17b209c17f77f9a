"""Undo lower_lora_triton on an export copy: ONNX has no fused LoRA op, but has the matmuls it fuses.

Each peftc::lora_linear / lora_linear_q node becomes the subgraph insert_lora made, tagged as
insert_lora tags it (the output add has role "output"), so the rest of the exporter (LoRA
weights as inputs, scale stripping, quantized-linear translation) sees an ordinary LoRA graph.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.ir import quantized
from peftc.ir.graph_edit import provenance

aten = torch.ops.aten


def _fused(name: str):
    """The fused op, or None if codegen.triton.ops never loaded (then no graph can hold it)."""
    return getattr(torch.ops.peftc, name).default if hasattr(torch.ops.peftc, name) else None


def unfuse_lora(gm: GraphModule) -> int:
    """Rewrite every fused LoRA node of `gm` back to base op + LoRA branch; returns how many."""
    fused_float, fused_quant = _fused("lora_linear"), _fused("lora_linear_q")
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is None or node.target not in (fused_float, fused_quant):
            continue
        with gm.graph.inserting_before(node):
            if node.target == fused_float:
                x, weight, bias, a, b, scale, x_lora = node.args
                base = gm.graph.call_function(aten.linear.default, (x, weight, bias))
            else:
                x, qdata, bias, *layout, a, b, scale, x_lora = node.args
                base = gm.graph.call_function(quantized.OP, (x, qdata, bias, *layout))
            hidden = gm.graph.call_function(aten.linear.default, (x if x_lora is None else x_lora, a))
            delta = gm.graph.call_function(aten.linear.default, (hidden, b))
            output = gm.graph.call_function(aten.add.Tensor, (base, delta), {"alpha": scale})
        _tag(node, base, hidden, delta, output)
        node.replace_all_uses_with(output)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _tag(fused: Node, base: Node, hidden: Node, delta: Node, output: Node) -> None:
    """The LoRA nodes get insert_lora's tags (output role on the add); the base op stays untagged, as captured."""
    tag = {**provenance(fused), "pass": "insert_lora"}
    for node in (base, hidden, delta, output):
        node.meta["nn_module_stack"] = fused.meta.get("nn_module_stack", {})
    hidden.meta["peftc"] = delta.meta["peftc"] = {**tag, "role": None}
    output.meta["peftc"] = {**tag, "role": "output"}

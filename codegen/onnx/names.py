"""Readable names in the ONNX graph: weights named after their parameters, outputs after the model's.

The exporter names each initializer after its parameter's fully qualified name, but constant
folding turns `Transpose(W)` (how a linear layer is lowered to MatMul) into an anonymous
`val_N` tensor. `fold_weight_transposes` folds those transposes itself, naming the result
`<fqn>.T`, and leaves the transpose of a shared (tied) weight in place so it is stored once.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

TRANSPOSED_SUFFIX = ".T"


def weight_transposes(graph: ir.Graph) -> list[ir.Node]:
    """Transpose nodes that swap the two axes of a constant 2-D weight (an initializer, not an input)."""
    found = []
    for node in graph:
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        source = node.inputs[0]
        if source is None or not is_constant_initializer(source) or len(source.shape) != 2:
            continue
        perm = node.attributes.get_ints("perm", None)
        if perm is None or list(perm) == [1, 0]:
            found.append(node)
    return found


def is_constant_initializer(value: ir.Value) -> bool:
    return value.is_initializer() and not value.is_graph_input() and value.const_value is not None


def is_shared(value: ir.Value) -> bool:
    """Read by more than one node: a tied weight (an embedding table also used as the output head)."""
    return len({id(node) for node, _ in value.uses()}) > 1


def fold_weight_transposes(graph: ir.Graph, *, keep_shared: bool) -> int:
    """Replace Transpose(W) by an initializer `<W's name>.T`; returns how many were folded."""
    folded = 0
    for node in weight_transposes(graph):
        source = node.inputs[0]
        if keep_shared and is_shared(source):
            continue
        array = np.ascontiguousarray(source.const_value.numpy().T)
        replacement = add_initializer(graph, source.name + TRANSPOSED_SUFFIX, array)
        node.outputs[0].replace_all_uses_with(replacement)
        graph.remove(node, safe=True)
        drop_if_unused(graph, source)
        folded += 1
    return folded


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, name)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def unique_name(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers) | {v.name for v in graph.inputs}
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}.{i}", i + 1
    return candidate


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        graph.initializers.pop(value.name)


def keep_shared_transposes(node: ir.Node) -> bool | None:
    """`should_fold` for onnxscript's optimizer: never fold the transpose of a tied weight."""
    if node.op_type == "Transpose" and node.inputs and node.inputs[0] is not None:
        source = node.inputs[0]
        if is_constant_initializer(source) and is_shared(source):
            return False
    return None


def name_outputs(graph: ir.Graph, names: list[str]) -> None:
    """Name graph outputs after the model's outputs (logits, ...) when the counts agree."""
    if len(names) != len(graph.outputs) or len(set(names)) != len(names):
        return
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    for value, name in zip(graph.outputs, names):
        if name not in taken:
            value.name = name

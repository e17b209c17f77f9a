"""Weight-only quantization in ONNX Runtime's formats: MatMulNBits and GatherBlockQuantized.

MatMuls go through onnxruntime.quantization's MatMulNBitsQuantizer (QOperator format; its
8-bit QDQ mode silently skips MatMuls, so it is never used). int8 is per output channel: one
block spans the whole input dimension K, up to 256, the largest block ORT's kernels take
(larger K: blocks of 256), so MatMuls are quantized in groups of equal block size. The
token-embedding tables become GatherBlockQuantized (ORT's tool quantizes Gather at 4 bits
only, so peftc packs both widths itself). Afterwards every targeted op is checked: a weight
left in float is an error, never a silent fallback.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from peftc.errors import ExportError

from peftc.core.files import atomic_file
from .logs import quiet
from .names import (
    TRANSPOSED_SUFFIX,
    add_initializer,
    drop_if_unused,
    fold_weight_transposes,
    is_constant_initializer,
    unique_name,
)

BITS = {"int8": 8, "int4": 4}
MS_DOMAIN = "com.microsoft"
MIN_OPSET = 21  # 4-bit tensor types
MAX_BLOCK = 256  # MLAS quantizes MatMulNBits weights in blocks of 16..256


def check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or not 16 <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise ExportError(f"block_size: expected a power of two from 16 to {MAX_BLOCK} (ONNX Runtime's MatMulNBits), "
                          f"got {block_size!r}")


def quantize_onnx(source, path, quantize: str = "int8", *, block_size: int = 32) -> Path:
    """Quantize an fp32 ONNX file written by export_onnx into `path` (no re-export from torch)."""
    if quantize not in BITS:
        raise ExportError(f"quantize: expected one of {list(BITS)}, got {quantize!r}")
    check_block_size(block_size)
    path = Path(path)
    with atomic_file(path, ExportError) as tmp:
        quantize_weights(ir.load(str(source)), BITS[quantize], block_size, tmp)
    return path


def quantize_weights(model: ir.Model, bits: int, block_size: int, out: Path) -> dict[str, int]:
    """Quantize every weight MatMul and embedding table of `model`, check, and save to `out`."""
    graph = model.graph
    # A tied weight's transpose was kept to store it once; quantized, the head gets its own MatMulNBits copy.
    fold_weight_transposes(graph, keep_shared=False)
    gemms_to_matmuls(graph)
    tables = quantize_embeddings(graph, bits, block_size)
    targets = weight_matmuls(graph)
    _raise_opset(model)
    proto = ir.serde.serialize_model(model)
    for block, names in _by_block(targets, bits, block_size).items():
        proto = _run_matmul_nbits(proto, bits, block, include=set(names))
    counts = verify(proto, bits, matmuls=len(targets), tables=tables)
    onnx.save(proto, str(out))
    return counts


# -- MatMul ----------------------------------------------------------------------------
def weight_matmuls(graph: ir.Graph) -> dict[str, int]:
    """MatMul nodes whose B is a constant 2-D float weight: node name -> K (B's rows)."""
    found = {}
    for node in graph:
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and _is_float_matrix(node.inputs[1]):
            found[node.name] = node.inputs[1].shape[0]
    return found


def _is_float_matrix(value: ir.Value | None) -> bool:
    return (value is not None and is_constant_initializer(value) and len(value.shape) == 2
            and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16))


def _by_block(targets: dict[str, int], bits: int, block_size: int) -> dict[int, list[str]]:
    """MatMul names grouped by their block size: int8 per channel (K, capped), int4 `block_size`."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, k in targets.items():
        groups[min(_next_power_of_two(k), MAX_BLOCK) if bits == 8 else block_size].append(name)
    return dict(groups)


def _next_power_of_two(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _run_matmul_nbits(proto: onnx.ModelProto, bits: int, block_size: int, include: set[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in include]
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=False,
                                     quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                     nodes_to_exclude=exclude)
    with quiet("onnxruntime.quantization", level=logging.WARNING):  # it logs every node at INFO
        quantizer.process()
    return quantizer.model.model


def gemms_to_matmuls(graph: ir.Graph) -> int:
    """Gemm(x, W, b) with a constant W (GPT-2's Conv1D, 2-D linears) -> MatMul + Add, so it can be quantized."""
    rewritten = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or not _is_float_matrix(node.inputs[1]):
            continue
        scales = (node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0))
        if scales != (1.0, 1.0) or node.attributes.get_int("transA", 0):
            continue
        original = node.inputs[1]
        weight = _transposed(graph, original) if node.attributes.get_int("transB", 0) else original
        new_nodes = [ir.node("MatMul", [node.inputs[0], weight], name=f"{node.name}_matmul")]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            new_nodes.append(ir.node("Add", [new_nodes[0].outputs[0], node.inputs[2]], name=f"{node.name}_bias"))
        _replace_node(graph, node, new_nodes)
        drop_if_unused(graph, original)
        rewritten += 1
    return rewritten


def _transposed(graph: ir.Graph, weight: ir.Value) -> ir.Value:
    return add_initializer(graph, weight.name + TRANSPOSED_SUFFIX, np.ascontiguousarray(weight.const_value.numpy().T))


def _replace_node(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node]) -> None:
    """Put `new_nodes` where `node` was; the last one's output takes over the old output's name and users."""
    old, new = node.outputs[0], new_nodes[-1].outputs[0]
    graph.insert_before(node, new_nodes)
    name, new.shape, new.type = old.name, old.shape, old.type
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = None
    new.name = name
    graph.remove(node, safe=True)


# -- embeddings ------------------------------------------------------------------------
def quantize_embeddings(graph: ir.Graph, bits: int, block_size: int) -> int:
    """Gather(table, ids) on a constant float table -> com.microsoft GatherBlockQuantized; returns the count."""
    packed: dict[str, list[ir.Value]] = {}
    replaced = 0
    for node in list(graph):
        if not _is_embedding_lookup(node):
            continue
        table = node.inputs[0]
        width = table.shape[1]
        block = _next_power_of_two(width) if bits == 8 else block_size
        if table.name not in packed:
            packed[table.name] = _pack_table(graph, table, bits, block)
        data, scales, zero_points = packed[table.name]
        lookup = ir.node("GatherBlockQuantized", [data, node.inputs[1], scales, zero_points], domain=MS_DOMAIN,
                         attributes={"gather_axis": 0, "quantize_axis": 1, "block_size": block, "bits": bits},
                         name=f"{node.name}_Q{bits}")
        _replace_node(graph, node, [lookup])
        drop_if_unused(graph, table)
        replaced += 1
    return replaced


def _is_embedding_lookup(node: ir.Node) -> bool:
    return (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.attributes.get_int("axis", 0) == 0
            and _is_float_matrix(node.inputs[0]))


def _pack_table(graph: ir.Graph, table: ir.Value, bits: int, block: int) -> list[ir.Value]:
    """Asymmetric block quantization along each row (the hidden dim), as GatherBlockQuantized reads it."""
    weights = table.const_value.numpy().astype(np.float32)
    rows, width = weights.shape
    blocks = -(-width // block)
    padded = np.zeros((rows, blocks * block), np.float32)
    padded[:, :width] = weights
    padded = padded.reshape(rows, blocks, block)
    levels = (1 << bits) - 1
    low = np.minimum(padded.min(axis=2), 0)
    high = np.maximum(padded.max(axis=2), 0)
    scales = (high - low) / levels
    scales[scales == 0] = 1.0
    zero_points = np.clip(np.round(-low / scales), 0, levels)
    q = np.clip(np.round(padded / scales[..., None] + zero_points[..., None]), 0, levels)
    q = q.reshape(rows, blocks * block)[:, :width]
    dtype, np_dtype = (ir.DataType.UINT8, np.uint8) if bits == 8 else (ir.DataType.UINT4, ml_dtypes.uint4)
    values = []
    for suffix, array, kind in ((f"_Q{bits}", q, dtype), ("_scales", scales.astype(weights.dtype), None),
                                ("_zero_points", zero_points, dtype)):
        if kind is not None:
            array = array.astype(np_dtype)
        name = unique_name(graph, table.name + suffix)
        tensor = ir.Tensor(array, dtype=kind, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        graph.register_initializer(value)
        values.append(value)
    return values


# -- checks ----------------------------------------------------------------------------
def verify(proto: onnx.ModelProto, bits: int, *, matmuls: int, tables: int) -> dict[str, int]:
    """Fail loudly unless every targeted MatMul and table now is a quantized op with `bits` bits."""
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    weights = {t.name for t in proto.graph.initializer if t.data_type in float_types and len(t.dims) == 2}
    left = [n.name for n in proto.graph.node
            if (n.op_type == "MatMul" and n.input[1] in weights) or (n.op_type == "Gather" and n.input[0] in weights)]
    counts = Counter(n.op_type for n in proto.graph.node)
    quantized = [n for n in proto.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
    wrong_bits = [n.name for n in quantized if _int_attr(n, "bits", 4) != bits]
    if left or wrong_bits or counts["MatMulNBits"] != matmuls or counts["GatherBlockQuantized"] != tables:
        raise ExportError(
            f"int{bits} quantization is incomplete: {len(left)} weight op(s) still in float ({left[:5]}), "
            f"{counts['MatMulNBits']}/{matmuls} MatMulNBits, {counts['GatherBlockQuantized']}/{tables} "
            f"GatherBlockQuantized, wrong bit width on {wrong_bits[:5]}; nothing was written")
    return {"MatMulNBits": matmuls, "GatherBlockQuantized": tables}


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _raise_opset(model: ir.Model) -> None:
    """4-bit tensors need IR version 10 and opset 21; the contrib ops need the com.microsoft domain."""
    model.opset_imports[""] = max(model.opset_imports.get("", MIN_OPSET), MIN_OPSET)
    model.opset_imports[MS_DOMAIN] = 1
    model.ir_version = max(model.ir_version, 10)

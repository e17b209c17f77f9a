"""ONNX for `peftc.quantized_linear`: the base stays packed in the file, dequantized by ONNX Runtime.

    torch.onnx.export(gm, args, dynamo=True, custom_translation_table=translation_table())

- int4 -> com.microsoft.MatMulNBits (bits 4): peftc's codes are its B layout already
  ([N, blocks, group/2], low nibble first); zero points go in as floats, one per block.
- nf4  -> com.microsoft.MatMulBnb4 (quant_type 1 = NF4): the same code book, so no error is
  added; bitsandbytes packs the first code in the high nibble, so the bytes are swapped in-graph.
  Its blocks run over the flattened weight, so a ragged last group (in_features not a multiple of
  the group) cannot use it: such a site dequantizes in the graph (codes still 4-bit in the file).
- int8 -> DequantizeLinear (per output channel) + MatMul.

Double-quantized scales are expanded to f32 in the graph (a few ops on the small scale tensors).
ONNX does not know the contrib ops' schemas; `translation_table()` registers the two it needs.
"""

from __future__ import annotations

import torch

from peftc.ir import quantized, weight_codec

CONTRIB = "com.microsoft"


def translation_table() -> dict:
    _register_contrib_schemas()
    return {quantized.OP: quantized_linear}


def quantized_linear(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype):
    import onnxscript
    from onnxscript import opset18 as op

    contrib = onnxscript.values.Opset(CONTRIB, 1)
    if fmt == "int8":
        weight = op.DequantizeLinear(qdata[0], qdata[1], axis=0)
        out = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    elif fmt == "int4":
        blocks = -(-in_features // group_size)
        codes = op.Reshape(qdata[0], op.Constant(value_ints=[out_features, blocks, group_size // 2]))
        scales = _scales(op, qdata[2:], out_features * blocks)
        zero_points = op.Reshape(op.Cast(qdata[1], to=1), op.Constant(value_ints=[-1]))
        out = onnxscript.values.Op(contrib, "MatMulNBits")(
            x, codes, scales, zero_points, K=in_features, N=out_features, bits=4, block_size=group_size)
    elif fmt == "nf4" and in_features % group_size:
        out = op.MatMul(x, op.Transpose(_nf4_weight(op, qdata, out_features, in_features, group_size), perm=[1, 0]))
    elif fmt == "nf4":
        low, high = op.BitwiseAnd(qdata[0], op.Constant(value=_u8(15))), op.BitShift(
            qdata[0], op.Constant(value=_u8(4)), direction="RIGHT")
        swapped = op.BitwiseOr(op.BitShift(low, op.Constant(value=_u8(4)), direction="LEFT"), high)
        codes = op.Reshape(swapped, op.Constant(value_ints=[-1]))
        absmax = _scales(op, qdata[1:], out_features * in_features // group_size)
        out = onnxscript.values.Op(contrib, "MatMulBnb4")(
            x, codes, absmax, K=in_features, N=out_features, block_size=group_size, quant_type=1)
    else:
        raise NotImplementedError(f"no ONNX lowering for quantized format {fmt!r}")
    return out if bias is None else op.Add(out, bias)


def _nf4_weight(op, qdata, out_features: int, in_features: int, group_size: int):
    """A ragged last group does not fit MatMulBnb4's flat blocks: dequantize in the graph instead
    (the file still holds the 4-bit codes; ONNX Runtime builds the f32 weight when it runs)."""
    blocks = -(-in_features // group_size)
    low = op.BitwiseAnd(qdata[0], op.Constant(value=_u8(15)))
    high = op.BitShift(qdata[0], op.Constant(value=_u8(4)), direction="RIGHT")
    codes = op.Reshape(op.Concat(op.Unsqueeze(low, op.Constant(value_ints=[2])),
                                 op.Unsqueeze(high, op.Constant(value_ints=[2])), axis=2),
                       op.Constant(value_ints=[out_features, blocks, group_size]))
    values = op.Gather(op.Constant(value_floats=list(weight_codec.NF4_CODE)), op.Cast(codes, to=7))
    absmax = op.Reshape(_scales(op, qdata[1:], out_features * blocks), op.Constant(value_ints=[out_features, blocks, 1]))
    weight = op.Reshape(op.Mul(values, absmax), op.Constant(value_ints=[out_features, blocks * group_size]))
    return op.Slice(weight, op.Constant(value_ints=[0]), op.Constant(value_ints=[in_features]),
                    op.Constant(value_ints=[1]))


def _scales(op, tensors, count: int):
    """Flat f32 scales; double-quantized ones are expanded: codes * block scale + mean."""
    if len(tensors) == 1:
        return op.Reshape(tensors[0], op.Constant(value_ints=[-1]))
    codes, block_scale, mean = tensors
    blocks = op.Reshape(op.Cast(codes, to=1), op.Constant(value_ints=[-1, weight_codec.SCALE_BLOCK]))
    values = op.Reshape(op.Mul(blocks, op.Unsqueeze(block_scale, op.Constant(value_ints=[1]))),
                        op.Constant(value_ints=[-1]))
    return op.Add(op.Slice(values, op.Constant(value_ints=[0]), op.Constant(value_ints=[count])), mean)


def _u8(value: int):
    import onnx
    return onnx.helper.make_tensor("c", onnx.TensorProto.UINT8, [], [value])


def _register_contrib_schemas() -> None:
    """Tell onnx the signatures of the two ONNX Runtime contrib ops (once per process)."""
    import onnx
    from onnx.defs import OpSchema

    param, attr = OpSchema.FormalParameter, OpSchema.Attribute
    optional = OpSchema.FormalParameterOption.Optional
    ints = lambda *names: [attr(n, OpSchema.AttrType.INT, "") for n in names]  # noqa: E731
    schemas = [
        OpSchema("MatMulNBits", CONTRIB, 1,
                 inputs=[param("A", "T1"), param("B", "T2"), param("scales", "T1"),
                         param("zero_points", "T1", param_option=optional)],
                 outputs=[param("Y", "T1")],
                 type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")],
                 attributes=ints("K", "N", "bits", "block_size")),
        OpSchema("MatMulBnb4", CONTRIB, 1,
                 inputs=[param("A", "T1"), param("B", "T2"), param("absmax", "T1")],
                 outputs=[param("Y", "T1")],
                 type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")],
                 attributes=ints("K", "N", "block_size", "quant_type")),
    ]
    for schema in schemas:
        if not onnx.defs.has(schema.name, schema.domain):
            onnx.defs.register_schema(schema)


def export(gm: torch.fx.GraphModule, args: tuple, path: str, kwargs: dict | None = None):
    """Export a graph with quantized sites to ONNX, weights still packed."""
    # optimize=False: the exporter's constant folding would turn in-graph dequantization back into
    # f32 initializers (ONNX Runtime folds at session start, in memory; the file stays packed).
    program = torch.onnx.export(gm, args, kwargs=kwargs, dynamo=True, custom_translation_table=translation_table(),
                                optimize=False)
    program.save(path)
    return program

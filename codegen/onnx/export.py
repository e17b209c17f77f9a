"""export_onnx: a CompiledModel to an ONNX file, merged, quantized, or with LoRA weights as inputs.

    graph copy (eval) ──torch.onnx (dynamo)──▶ ONNX IR ──▶ LoRA inputs (merge=False)
        ──▶ named weight transposes ──▶ onnxscript optimizer ──▶ output names
        ──▶ MatMulNBits / GatherBlockQuantized (quantize=) ──▶ file (written atomically)
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from torch.fx import GraphModule

from peftc.capture.calls import CallSignature, normalize_call
from peftc.capture.example_inputs import example_call
from peftc.capture.export import capture
from peftc.errors import ExportError
from peftc.runtime.compiled import CompiledModel
from peftc.runtime.dispatch import GraphDispatch

from . import quantized_linear, signature
from peftc.core.files import atomic_file
from .graph_copy import eval_copy, strip_lora_scales
from .logs import quiet
from .lora_inputs import promote_lora_inputs
from .names import fold_weight_transposes, keep_shared_transposes, name_outputs
from .quantize import BITS, check_block_size, quantize_weights

QUANTIZE_CHOICES = tuple(BITS)


def export_onnx(cm, path, *, merge: bool = True, quantize: str | None = None, example_inputs: Any = None,
                opset: int | None = None, block_size: int = 32) -> Path:
    """Export `cm` to `path` and return the path; raises ExportError and leaves no file on failure.

    `cm` is a CompiledModel, or a plain nn.Module (captured here and exported as it is).

    merge=True folds the adapters into the weights; merge=False keeps LoRA weights as
    overridable inputs (see export_adapter). quantize="int8" (per output channel) or "int4"
    (blocks of `block_size`) stores weights in ONNX Runtime's MatMulNBits/GatherBlockQuantized.
    """
    if quantize is not None and quantize not in BITS:
        raise ExportError(f"quantize: expected one of {[None, *QUANTIZE_CHOICES]}, got {quantize!r}")
    check_block_size(block_size)
    check_opset(opset)
    path = Path(path)
    with atomic_file(path, ExportError) as tmp:
        gm = graph_for_export(cm, merge, example_inputs)
        model = to_onnx(gm, example_inputs_for(cm, gm, example_inputs), opset)
        prepare(model, gm, merge=merge)
        if quantize is not None:
            quantize_weights(model, BITS[quantize], block_size, tmp)
        else:
            ir.save(model, tmp)
    return path


MIN_OPSET = 18  # torch's dynamo exporter writes opset 18 and converts only upward


def check_opset(opset: Any) -> None:
    """torch.onnx silently writes opset 18 for an opset it cannot produce: refuse those here instead."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not MIN_OPSET <= opset <= newest):
        raise ExportError(f"opset: expected an integer from {MIN_OPSET} to {newest} (what torch's ONNX exporter "
                          f"and the installed onnx support), got {opset!r}")


def graph_for_export(cm, merge: bool, example_inputs: Any) -> GraphModule:
    """An eval-mode graph for the example's call signature, built for export.

    A CompiledModel builds it through its Compilation under the export plan: torch ops only
    (no fused shrinks: the LoRA inputs then take any rank; no Triton lowering: ONNX has the
    matmuls, not the fused op), merged or not. Other dispatches (a merged() model) export the
    graph they hold.
    """
    if not isinstance(cm, GraphDispatch):
        return eval_copy(capture_plain(cm, example_inputs))
    args, kwargs = user_example(cm, example_inputs) if example_inputs is not None else cm.example_call
    serving = getattr(cm.plan, "serving", None)
    if isinstance(cm, CompiledModel):
        gm = cm.build_under(cm.compilation.export_plan(merge), (args, kwargs)).built.graph_module
    elif serving is not None:  # a served model: its adapters and the `adapter_ids` input, gathered
        gm = cm.build_under(cm.compilation.serve_export_plan(serving), (args, kwargs)).built.graph_module
    else:
        gm = _dispatched_graph(cm, args, kwargs)
    copy = eval_copy(gm)
    if not merge:
        strip_lora_scales(copy)
    return copy


def _dispatched_graph(dispatch: GraphDispatch, args: tuple, kwargs: dict) -> GraphModule:
    gm = dispatch.graphs.get(CallSignature.of(args, kwargs))
    if gm is None:  # a call signature not seen yet: let the dispatcher capture it
        with torch.no_grad():
            dispatch(*args, **kwargs)
        gm = dispatch.graphs[CallSignature.of(args, kwargs)]
    return gm


def capture_plain(model: torch.nn.Module, example_inputs: Any) -> GraphModule:
    """A model that was never compiled: capture it as peftc.compile would, without passes."""
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"export_onnx: expected a CompiledModel or an nn.Module, got {type(model).__name__}")
    args, kwargs = user_example(model, example_inputs) if example_inputs is not None else example_call(model, None, None)
    return capture(model, args, kwargs)


def user_example(cm, example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    else:
        args, kwargs = (example_inputs,), {}
    return normalize_call(cm.compilation.source if isinstance(cm, GraphDispatch) else cm, args, kwargs)


def example_inputs_for(cm, gm: GraphModule, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is not None:
        return user_example(cm, example_inputs)
    return signature.example_call(gm)


def to_onnx(gm: GraphModule, example: tuple[tuple, dict], opset: int | None) -> ir.Model:
    """Run torch's dynamo exporter on the graph module, unoptimized (peftc optimizes after naming)."""
    args, kwargs = example
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(gm, args, kwargs=kwargs, dynamic_shapes=signature.dynamic_shapes(args, kwargs, gm),
                                        dynamo=True, optimize=False, opset_version=opset, verbose=False,
                                        custom_translation_table=quantized_linear.translation_table())
    except Exception as err:  # the exporter raises many types; keep the root cause's message
        raise ExportError(f"torch.onnx could not export the compiled graph: {_root_cause(err)}\n"
                          "Try: pass example_inputs= matching a real call, or opset= another version; "
                          "ops without an ONNX translation need a custom_translation_table") from err
    return program.model


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # the exporter colours its messages
    return f"{type(err).__name__}: {text.splitlines()[0][:400]}" if text else type(err).__name__


def prepare(model: ir.Model, gm: GraphModule, *, merge: bool) -> None:
    """LoRA inputs, named weight transposes, constant folding and fusions, output names."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    graph = model.graph
    if not merge:
        promote_lora_inputs(graph)
    fold_weight_transposes(graph, keep_shared=True)  # a tied weight stays one tensor
    with quiet("onnx_ir", "onnxscript"):  # e.g. "skipped deduplication" of every LoRA input
        onnxscript.optimizer.optimize_ir(model, should_fold=keep_shared_transposes)
        onnxscript.rewriter.onnx_fusions.fuse(model)
    name_outputs(graph, signature.output_names(gm))

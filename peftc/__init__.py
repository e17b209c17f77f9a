"""peftc: a compiler for parameter-efficient fine-tuning.

    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"]}]})
"""

from peftc.compiler.compile import compile
from peftc.errors import (
    CallError,
    CaptureError,
    CheckpointError,
    ExportError,
    LinkError,
    PartitionError,
    SpecError,
)
from peftc.interop.from_peft import from_peft
from peftc.partitioning import Partition, connect, partition, serve_base
from peftc.runtime.compiled import CompiledModel
from peftc.runtime.dispatch import GraphDispatch
from peftc.serving.multi_train import MultiAdapterModel, train_adapters
from peftc.serving.served import ServedModel, serve_adapters
from peftc.spec.parse import Spec

__version__ = "0.1.0"


def export_onnx(cm, path, *, merge=True, quantize=None, example_inputs=None, opset=None, block_size=32):
    """Export a CompiledModel to ONNX: merged, quantized ("int8" | "int4"), or with LoRA inputs (merge=False).

    Imported on first use: the ONNX tooling is heavy and only export needs it.
    """
    from peftc.codegen.onnx.export import export_onnx as export

    return export(cm, path, merge=merge, quantize=quantize, example_inputs=example_inputs, opset=opset,
                  block_size=block_size)


def export_adapter(cm_or_adapter_dir, path):
    """Write a LoRA adapter in ONNX Runtime's adapter format (see peftc.codegen.onnx.adapter_file)."""
    from peftc.codegen.onnx.adapter_file import export_adapter as export

    return export(cm_or_adapter_dir, path)


__all__ = ["compile", "Spec", "CompiledModel", "GraphDispatch", "SpecError", "CaptureError", "CallError",
           "CheckpointError",
           "ExportError", "from_peft", "export_onnx", "export_adapter", "serve_adapters", "ServedModel",
           "train_adapters", "MultiAdapterModel", "partition", "Partition", "connect", "serve_base",
           "PartitionError", "LinkError"]

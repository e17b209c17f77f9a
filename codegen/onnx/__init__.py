"""ONNX export: merged, quantized, or with LoRA weights as inputs and ONNX Runtime adapter files."""

from .adapter_file import export_adapter
from .export import export_onnx
from .quantize import quantize_onnx

__all__ = ["export_onnx", "export_adapter", "quantize_onnx"]

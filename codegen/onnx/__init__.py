"""ONNX export: merged, quantized, or with adapters as inputs."""

"""Back ends: ONNX export and Triton kernels."""

"""Triton kernels: fused LoRA linear, dequant + LoRA, multi-adapter batches."""

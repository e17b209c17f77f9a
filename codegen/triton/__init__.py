"""Triton kernels: fused LoRA linear, dequant + LoRA, and multi-adapter batches (BGMV / SGMV).

Use: ``peftc.compile(model, spec, backend="triton")`` runs the lower_lora_triton pass, which
replaces every linear site's ``base matmul + s * B(A(dropout(x)))`` by one
``torch.ops.peftc.lora_linear``; over a base the quantize pass packed to int8/int4/nf4,
``peftc::quantized_linear`` + LoRA becomes one ``lora_linear_q``, which dequantizes inside the
matmul. The ops run Triton kernels on CUDA and the torch reference elsewhere, so a model
compiled without a GPU (a warning says so) runs and trains exactly as backend="torch", and
uses the kernels once moved to a CUDA device.
``cm.report()`` notes which sites were lowered, to which op, and the backend.

Modules: reference (torch oracles), kernels (the one strided fused matmul kernel), fused
(forward/backward launchers), multi (BGMV/SGMV kernels), ops and multi_ops (torch.library
custom ops: CUDA/other kernels, fake, autograd). Packed weights use peftc.ir.weight_codec's layouts, as quantize_base stores them.
Kernel modules import triton lazily from the ops, so importing peftc never needs triton.
Tests run the kernels on CPU with TRITON_INTERPRET=1 (set before the kernel modules load).
Importing this package registers every op (`torch.ops.peftc.*`).
"""

from . import multi_ops, ops  # noqa: F401  (registering the ops is the import's effect)

"""Custom ops (torch.library): Triton kernels on CUDA, the torch reference on every other device.

    peftc::lora_linear(x, weight, bias, A, B, scale, x_lora)            y = x W^T + b + s (x_lora A^T) B^T
    peftc::lora_linear_q(x, qweight, scales, format, group_size, in_features, bias, A, B, scale, x_lora)
                                                                        the same with W packed (formats.py)

x_lora is None unless the adapter branch has its own input (LoRA dropout). The fused ops
have a fake (meta) implementation and autograd giving gradients for x, x_lora, bias, A and B;
the base weight is frozen and gets none. The backward is itself an op
(peftc::lora_linear_backward / lora_linear_q_backward), so it also runs Triton on CUDA.
The multi-adapter ops (BGMV / SGMV) are in multi_ops.py, registered when this module loads.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import formats, reference


def triton_ready(device: torch.device | str) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (CUDA and an importable triton)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


def _weight(qweight, scales, fmt, group_size, in_features):
    from .kernels import Weight

    return Weight(qweight, fmt, scales, group_size, in_features)


# -- float base weight ---------------------------------------------------------------------------

@torch.library.custom_op("peftc::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, scale: float,
                x_lora: Optional[Tensor]) -> Tensor:
    return reference.lora_linear(x, weight, bias, a, b, scale, x_lora)


@lora_linear.register_kernel("cuda")
def _lora_linear_cuda(x, weight, bias, a, b, scale, x_lora):
    if not triton_ready(x.device):
        return reference.lora_linear(x, weight, bias, a, b, scale, x_lora)
    return lora_linear_triton(x, weight, bias, a, b, scale, x_lora)


def lora_linear_triton(x, weight, bias, a, b, scale, x_lora=None):
    """The Triton forward (the CUDA kernel of peftc::lora_linear; callable under the interpreter)."""
    from .fused import lora_linear_forward
    from .kernels import Weight

    return lora_linear_forward(x.contiguous(), Weight(weight), bias, a, b, scale,
                               None if x_lora is None else x_lora.contiguous())


@lora_linear.register_fake
def _lora_linear_fake(x, weight, bias, a, b, scale, x_lora):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftc::lora_linear_backward", mutates_args=())
def lora_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, a: Tensor, b: Tensor, scale: float,
                         x_lora: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dx_lora — empty when x_lora is None —, dA, dB)."""
    return _backward_torch(dy, x, weight, a, b, scale, x_lora)


def _backward_torch(dy, x, weight, a, b, scale, x_lora):
    dx, dx_lora, da, db = reference.lora_linear_backward(dy, x, weight, a, b, scale, x_lora)
    return dx, _empty(x) if dx_lora is None else dx_lora, da, db


@lora_linear_backward.register_kernel("cuda")
def _lora_linear_backward_cuda(dy, x, weight, a, b, scale, x_lora):
    if not triton_ready(x.device):
        return _backward_torch(dy, x, weight, a, b, scale, x_lora)
    return lora_linear_backward_triton(dy, x, weight, a, b, scale, x_lora)


def lora_linear_backward_triton(dy, x, weight, a, b, scale, x_lora=None):
    from .fused import lora_linear_backward as launch_backward
    from .kernels import Weight

    dx, dx_lora, da, db = launch_backward(dy.contiguous(), x.contiguous(), Weight(weight), a, b, scale,
                                          None if x_lora is None else x_lora.contiguous())
    return dx, _empty(x) if dx_lora is None else dx_lora, da, db


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(dy, x, weight, a, b, scale, x_lora):
    return (torch.empty_like(x), _empty(x) if x_lora is None else torch.empty_like(x_lora),
            torch.empty_like(a), torch.empty_like(b))


def _setup_float(ctx, inputs, output):
    x, weight, bias, a, b, scale, x_lora = inputs
    ctx.save_for_backward(x, weight, a, b, x_lora)
    ctx.scale, ctx.has_x_lora = scale, x_lora is not None


def _backward_float(ctx, dy):
    x, weight, a, b, x_lora = ctx.saved_tensors
    dx, dx_lora, da, db = lora_linear_backward(dy, x, weight, a, b, ctx.scale, x_lora if ctx.has_x_lora else None)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
    return dx, None, dbias, da, db, None, dx_lora if ctx.has_x_lora else None


torch.library.register_autograd("peftc::lora_linear", _backward_float, setup_context=_setup_float)


# -- packed quantized base weight ----------------------------------------------------------------

def _dequant_reference(x, qweight, scales, fmt, group_size, in_features):
    return formats.dequantize(fmt, qweight, scales, group_size, in_features, dtype=x.dtype)


@torch.library.custom_op("peftc::lora_linear_q", mutates_args=())
def lora_linear_q(x: Tensor, qweight: Tensor, scales: Tensor, fmt: str, group_size: int, in_features: int,
                  bias: Optional[Tensor], a: Tensor, b: Tensor, scale: float, x_lora: Optional[Tensor]) -> Tensor:
    return _quant_forward_torch(x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora)


def _quant_forward_torch(x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora):
    weight = _dequant_reference(x, qweight, scales, fmt, group_size, in_features)
    return reference.lora_linear(x, weight, bias, a, b, scale, x_lora)


@lora_linear_q.register_kernel("cuda")
def _lora_linear_q_cuda(x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora):
    if not triton_ready(x.device):
        return _quant_forward_torch(x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora)
    return lora_linear_q_triton(x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora)


def lora_linear_q_triton(x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora=None):
    """The Triton dequant + LoRA forward: W is dequantized tile by tile inside the matmul."""
    from .fused import lora_linear_forward

    weight = _weight(qweight, scales, fmt, group_size, in_features)
    return lora_linear_forward(x.contiguous(), weight, bias, a, b, scale,
                               None if x_lora is None else x_lora.contiguous())


@lora_linear_q.register_fake
def _lora_linear_q_fake(x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("peftc::lora_linear_q_backward", mutates_args=())
def lora_linear_q_backward(dy: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, fmt: str, group_size: int,
                           in_features: int, a: Tensor, b: Tensor, scale: float,
                           x_lora: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _quant_backward_torch(dy, x, qweight, scales, fmt, group_size, in_features, a, b, scale, x_lora)


def _quant_backward_torch(dy, x, qweight, scales, fmt, group_size, in_features, a, b, scale, x_lora):
    weight = _dequant_reference(x, qweight, scales, fmt, group_size, in_features)
    return _backward_torch(dy, x, weight, a, b, scale, x_lora)


@lora_linear_q_backward.register_kernel("cuda")
def _lora_linear_q_backward_cuda(dy, x, qweight, scales, fmt, group_size, in_features, a, b, scale, x_lora):
    args = (dy, x, qweight, scales, fmt, group_size, in_features, a, b, scale, x_lora)
    if not triton_ready(x.device):
        return _quant_backward_torch(*args)
    return lora_linear_q_backward_triton(*args)


def lora_linear_q_backward_triton(dy, x, qweight, scales, fmt, group_size, in_features, a, b, scale, x_lora=None):
    from .fused import lora_linear_backward as launch_backward

    weight = _weight(qweight, scales, fmt, group_size, in_features)
    dx, dx_lora, da, db = launch_backward(dy.contiguous(), x.contiguous(), weight, a, b, scale,
                                          None if x_lora is None else x_lora.contiguous())
    return dx, _empty(x) if dx_lora is None else dx_lora, da, db


@lora_linear_q_backward.register_fake
def _lora_linear_q_backward_fake(dy, x, qweight, scales, fmt, group_size, in_features, a, b, scale, x_lora):
    return (torch.empty_like(x), _empty(x) if x_lora is None else torch.empty_like(x_lora),
            torch.empty_like(a), torch.empty_like(b))


def _setup_quant(ctx, inputs, output):
    x, qweight, scales, fmt, group_size, in_features, bias, a, b, scale, x_lora = inputs
    ctx.save_for_backward(x, qweight, scales, a, b, x_lora)
    ctx.args = (fmt, group_size, in_features)
    ctx.scale, ctx.has_x_lora = scale, x_lora is not None


def _backward_quant(ctx, dy):
    x, qweight, scales, a, b, x_lora = ctx.saved_tensors
    dx, dx_lora, da, db = lora_linear_q_backward(dy, x, qweight, scales, *ctx.args, a, b, ctx.scale,
                                                 x_lora if ctx.has_x_lora else None)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[6] else None
    return dx, None, None, None, None, None, dbias, da, db, None, dx_lora if ctx.has_x_lora else None


torch.library.register_autograd("peftc::lora_linear_q", _backward_quant, setup_context=_setup_quant)


# -- the dequantize the lowering pass folds into lora_linear_q -----------------------------------

@torch.library.custom_op("peftc::dequantize_packed", mutates_args=())
def dequantize_packed(qweight: Tensor, scales: Tensor, fmt: str, group_size: int, in_features: int,
                      dtype: torch.dtype) -> Tensor:
    """W [N, K] from a packed weight (formats.py). A quantized base that reads its weight through
    this op has its dequantize fused into the LoRA matmul by lower_lora_triton."""
    return formats.dequantize(fmt, qweight, scales, group_size, in_features, dtype=dtype)


@dequantize_packed.register_fake
def _dequantize_packed_fake(qweight, scales, fmt, group_size, in_features, dtype):
    return qweight.new_empty(qweight.shape[0], in_features, dtype=dtype)


from . import multi_ops  # noqa: E402,F401  (registers peftc::lora_bgmv / lora_sgmv)

"""Custom ops (torch.library): Triton kernels on CUDA, the torch reference on every other device.

    peftc::lora_linear(x, weight, bias, A, B, scale, x_lora)            y = x W^T + b + s (x_lora A^T) B^T
    peftc::lora_linear_q(x, qdata, bias, format, out, in, group_size, compute_dtype, A, B, scale, x_lora)
                         the same over a packed base: quantize_base's peftc::quantized_linear + LoRA

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

from peftc.ir import quantized

from . import reference
from .dispatch import on_cuda


def _in_dtype(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors as contiguous `dtype` (the dequant kernel runs in the base's compute dtype); None stays."""
    return [None if t is None else t.to(dtype).contiguous() for t in tensors]


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


# -- float base weight ---------------------------------------------------------------------------

@torch.library.custom_op("peftc::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a: Tensor, b: Tensor, scale: float,
                x_lora: Optional[Tensor]) -> Tensor:
    return reference.lora_linear(x, weight, bias, a, b, scale, x_lora)


def lora_linear_triton(x, weight, bias, a, b, scale, x_lora=None):
    """The Triton forward (the CUDA kernel of peftc::lora_linear; callable under the interpreter)."""
    from .fused import lora_linear_forward
    from .kernels import Weight

    return lora_linear_forward(x.contiguous(), Weight(weight), bias, a, b, scale,
                               None if x_lora is None else x_lora.contiguous())


_lora_linear_cuda = on_cuda(lora_linear, lora_linear_triton, reference.lora_linear)


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


def lora_linear_backward_triton(dy, x, weight, a, b, scale, x_lora=None):
    from .fused import lora_linear_backward as launch_backward
    from .kernels import Weight

    dx, dx_lora, da, db = launch_backward(dy.contiguous(), x.contiguous(), Weight(weight), a, b, scale,
                                          None if x_lora is None else x_lora.contiguous())
    return dx, _empty(x) if dx_lora is None else dx_lora, da, db


_lora_linear_backward_cuda = on_cuda(lora_linear_backward, lora_linear_backward_triton, _backward_torch)


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


# -- packed quantized base weight (quantize_base's peftc::quantized_linear + LoRA) -----------------
# The arguments after x mirror peftc::quantized_linear's: qdata is the packed tensor list of
# peftc.ir.weight_codec (codes, [zero points,] scales or double-quantized scales), compute_dtype the dtype
# the base matmul runs in. The torch path is that op's math plus the LoRA branch, op for op.

@torch.library.custom_op("peftc::lora_linear_q", mutates_args=())
def lora_linear_q(x: Tensor, qdata: list[Tensor], bias: Optional[Tensor], fmt: str, out_features: int,
                  in_features: int, group_size: int, compute_dtype: torch.dtype, a: Tensor, b: Tensor, scale: float,
                  x_lora: Optional[Tensor]) -> Tensor:
    return _quant_forward_torch(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype,
                                a, b, scale, x_lora)


def _quant_forward_torch(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype, a, b, scale,
                         x_lora):
    base = quantized.linear(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype)
    return reference.with_adapter(base, x, a, b, scale, x_lora)


def lora_linear_q_triton(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype, a, b, scale,
                         x_lora=None):
    """The Triton dequant + LoRA forward: W is dequantized tile by tile inside the matmul.

    The kernel runs in compute_dtype (the adapter branch too, unlike the torch path, which adds it
    in x's dtype) and returns x's dtype; with compute_dtype == x.dtype, the usual case, both agree.
    """
    from .fused import lora_linear_forward
    from .kernels import Weight

    weight = Weight.packed(qdata, fmt, out_features, in_features, group_size)
    x_, bias_, a_, b_, x_lora_ = _in_dtype(compute_dtype, x, bias, a, b, x_lora)
    y = lora_linear_forward(x_, weight, bias_, a_, b_, scale, x_lora_)
    return y.to(x.dtype)


_lora_linear_q_cuda = on_cuda(lora_linear_q, lora_linear_q_triton, _quant_forward_torch)


@lora_linear_q.register_fake
def _lora_linear_q_fake(x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype, a, b, scale,
                        x_lora):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("peftc::lora_linear_q_backward", mutates_args=())
def lora_linear_q_backward(dy: Tensor, x: Tensor, qdata: list[Tensor], fmt: str, out_features: int,
                           in_features: int, group_size: int, compute_dtype: torch.dtype, a: Tensor, b: Tensor,
                           scale: float, x_lora: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dx_lora — empty when x_lora is None —, dA, dB); the base weight is dequantized again."""
    return _quant_backward_torch(dy, x, qdata, fmt, out_features, in_features, group_size, compute_dtype, a, b,
                                 scale, x_lora)


def _quant_backward_torch(dy, x, qdata, fmt, out_features, in_features, group_size, compute_dtype, a, b, scale,
                          x_lora):
    dx_base = quantized.linear_grad_x(dy, qdata, fmt, out_features, in_features, group_size, compute_dtype,
                                      x.dtype)
    dx, dx_lora, da, db = reference.with_adapter_grads(dx_base, dy, x, a, b, scale, x_lora)
    return dx, _empty(x) if dx_lora is None else dx_lora, da, db


def lora_linear_q_backward_triton(dy, x, qdata, fmt, out_features, in_features, group_size, compute_dtype, a, b,
                                  scale, x_lora=None):
    from .fused import lora_linear_backward as launch_backward
    from .kernels import Weight

    weight = Weight.packed(qdata, fmt, out_features, in_features, group_size)
    dy_, x_, a_, b_, x_lora_ = _in_dtype(compute_dtype, dy, x, a, b, x_lora)
    dx, dx_lora, da, db = launch_backward(dy_, x_, weight, a_, b_, scale, x_lora_)
    return (dx.to(x.dtype), _empty(x) if dx_lora is None else dx_lora.to(x.dtype), da.to(a.dtype),
            db.to(b.dtype))


_lora_linear_q_backward_cuda = on_cuda(lora_linear_q_backward, lora_linear_q_backward_triton,
                                       _quant_backward_torch)


@lora_linear_q_backward.register_fake
def _lora_linear_q_backward_fake(dy, x, qdata, fmt, out_features, in_features, group_size, compute_dtype, a, b,
                                 scale, x_lora):
    return (torch.empty_like(x), _empty(x) if x_lora is None else torch.empty_like(x_lora),
            torch.empty_like(a), torch.empty_like(b))


def _setup_quant(ctx, inputs, output):
    x, qdata, bias, fmt, out_features, in_features, group_size, compute_dtype, a, b, scale, x_lora = inputs
    ctx.save_for_backward(x, a, b, x_lora, *qdata)  # the packed buffers: no full-precision weight is kept
    ctx.args = (fmt, out_features, in_features, group_size, compute_dtype)
    ctx.scale, ctx.has_x_lora = scale, x_lora is not None


def _backward_quant(ctx, dy):
    x, a, b, x_lora, *qdata = ctx.saved_tensors
    dx, dx_lora, da, db = lora_linear_q_backward(dy, x, qdata, *ctx.args, a, b, ctx.scale,
                                                 x_lora if ctx.has_x_lora else None)
    dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
    return (dx, [None] * len(qdata), dbias, None, None, None, None, None, da, db, None,
            dx_lora if ctx.has_x_lora else None)


torch.library.register_autograd("peftc::lora_linear_q", _backward_quant, setup_context=_setup_quant)

"""Multi-adapter custom ops (Punica-style serving): one base, a bank of stacked LoRA adapters.

    peftc::lora_bgmv(x, weight, bias, A_bank, B_bank, scales, idx)      row i uses adapter idx[i] (decode)
    peftc::lora_sgmv(x, weight, bias, A_bank, B_bank, scales, seg_starts, seg_adapters)   segments (prefill)
    peftc::lora_multi(x, weight, bias, A_bank, B_bank, scales, seq_ids)  x[b] uses adapter seq_ids[b]:
        BGMV when each sequence has one row here (decode), else SGMV over runs of equal ids (prefill)
    peftc::lora_gather(...)  lora_multi's arguments and result, as gathers and batched matmuls (export)
    peftc::scale_rows(x, bank, seq_ids, bias, bias_bank)  x[b] ⊙ bank[seq_ids[b]] (x holding `bias`, which
        ends up scaled by bias_bank[..]): elementwise adapters (IA3, DoRA's magnitude) per row
    peftc::bottleneck_rows(h, down, down_bias, up, up_bias, scales, seq_ids, activation)
        bottleneck adapters per row: gathered banks, two batched matmuls

Banks: A [n, r, K], B [n, N, r], scales [n]; -1 means the base alone. Triton kernels (multi.py)
on CUDA, the torch reference elsewhere. Autograd gives x, bias, A_bank and B_bank gradients (the
base weight is frozen; scales and indices get none); the backward is itself an op
(peftc::lora_bgmv_backward / lora_sgmv_backward) whose CUDA kernel reuses the shrink/expand
kernels on transposed banks for dx, and reduces dA / dB per adapter with grouped torch matmuls
(one matmul pair per adapter present: cuBLAS, not a Triton kernel). lora_multi is a
CompositeImplicitAutograd op: it only routes, so autograd runs through the op it picks (on plain eager
CPU tensors, autograd Functions over the same torch functions: `_eager_cpu`). Bank slots with scale 0
(adapters that do not target the site) are skipped by the torch path: no matmuls, zero gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import reference
from .dispatch import on_cuda


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _dbias(ctx, dy: Tensor, bias_index: int) -> Tensor | None:
    return dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.needs_input_grad[bias_index] else None


# -- BGMV ----------------------------------------------------------------------------------------

@torch.library.custom_op("peftc::lora_bgmv", mutates_args=())
def lora_bgmv(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_bank: Tensor, b_bank: Tensor, scales: Tensor,
              idx: Tensor) -> Tensor:
    return reference.lora_bgmv(x, weight, bias, a_bank, b_bank, scales, idx)


def lora_bgmv_triton(x, weight, bias, a_bank, b_bank, scales, idx):
    from .multi import bgmv_add_

    x2 = _rows(x)
    y2 = torch.nn.functional.linear(x2, weight, bias)
    bgmv_add_(y2, x2, a_bank.contiguous(), b_bank.contiguous(), scales, idx)
    return y2.view(*x.shape[:-1], weight.shape[0])


on_cuda(lora_bgmv, lora_bgmv_triton, reference.lora_bgmv)


@lora_bgmv.register_fake
def _lora_bgmv_fake(x, weight, bias, a_bank, b_bank, scales, idx):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftc::lora_bgmv_backward", mutates_args=())
def lora_bgmv_backward(dy: Tensor, x: Tensor, weight: Tensor, a_bank: Tensor, b_bank: Tensor, scales: Tensor,
                       idx: Tensor, needs_dx: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA_bank, dB_bank); rows with idx -1 give no adapter gradient; needs_dx=False: dx is empty."""
    return reference.lora_bgmv_backward(dy, x, weight, a_bank, b_bank, scales, idx, needs_dx)


def lora_bgmv_backward_triton(dy, x, weight, a_bank, b_bank, scales, idx, needs_dx=True):
    """dx: cuBLAS dy W plus the BGMV kernels on transposed banks; dA / dB: grouped torch matmuls."""
    from .multi import bgmv_backward

    dy2, x2 = _rows(dy), _rows(x)
    dx2 = dy2 @ weight
    u, h = bgmv_backward(dy2, x2, dx2, a_bank.contiguous(), b_bank.contiguous(), scales, idx)
    da, db = reference.bank_grads(dy2, x2, u, h, a_bank, b_bank, scales, reference.adapter_groups(idx, scales))
    return (dx2.view(x.shape) if needs_dx else x.new_empty(0)), da, db


on_cuda(lora_bgmv_backward, lora_bgmv_backward_triton, reference.lora_bgmv_backward)


@lora_bgmv_backward.register_fake
def _lora_bgmv_backward_fake(dy, x, weight, a_bank, b_bank, scales, idx, needs_dx=True):
    return _dx_like(x, needs_dx), torch.empty_like(a_bank), torch.empty_like(b_bank)


def _dx_like(x: Tensor, needs_dx: bool) -> Tensor:
    return torch.empty_like(x) if needs_dx else x.new_empty(0)


def _setup_bgmv(ctx, inputs, output):
    x, weight, bias, a_bank, b_bank, scales, idx = inputs
    ctx.save_for_backward(x, weight, a_bank, b_bank, scales, idx)


def _backward_bgmv(ctx, dy):
    x, weight, a_bank, b_bank, scales, idx = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_bgmv_backward(dy, x, weight, a_bank, b_bank, scales, idx, needs_dx)
    return (dx if needs_dx else None), None, _dbias(ctx, dy, 2), da, db, None, None


torch.library.register_autograd("peftc::lora_bgmv", _backward_bgmv, setup_context=_setup_bgmv)


# -- SGMV ----------------------------------------------------------------------------------------

@torch.library.custom_op("peftc::lora_sgmv", mutates_args=())
def lora_sgmv(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_bank: Tensor, b_bank: Tensor, scales: Tensor,
              seg_starts: Tensor, seg_adapters: Tensor) -> Tensor:
    return reference.lora_sgmv(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters)


def lora_sgmv_triton(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
    from .multi import sgmv_add_

    x2 = _rows(x)
    y2 = torch.nn.functional.linear(x2, weight, bias)
    sgmv_add_(y2, x2, a_bank.contiguous(), b_bank.contiguous(), scales, seg_starts, seg_adapters)
    return y2.view(*x.shape[:-1], weight.shape[0])


on_cuda(lora_sgmv, lora_sgmv_triton, reference.lora_sgmv)


@lora_sgmv.register_fake
def _lora_sgmv_fake(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftc::lora_sgmv_backward", mutates_args=())
def lora_sgmv_backward(dy: Tensor, x: Tensor, weight: Tensor, a_bank: Tensor, b_bank: Tensor, scales: Tensor,
                       seg_starts: Tensor, seg_adapters: Tensor, needs_dx: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dA_bank, dB_bank); -1 segments give no adapter gradient; needs_dx=False: dx is empty."""
    return reference.lora_sgmv_backward(dy, x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters, needs_dx)


def lora_sgmv_backward_triton(dy, x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters, needs_dx=True):
    """dx: cuBLAS dy W plus the SGMV kernels on transposed banks; dA / dB: one matmul pair per segment."""
    from .multi import sgmv_backward

    dy2, x2 = _rows(dy), _rows(x)
    dx2 = dy2 @ weight
    u, h = sgmv_backward(dy2, x2, dx2, a_bank.contiguous(), b_bank.contiguous(), scales, seg_starts, seg_adapters)
    groups = reference.segment_groups(seg_starts, seg_adapters, scales)
    da, db = reference.bank_grads(dy2, x2, u, h, a_bank, b_bank, scales, groups)
    return (dx2.view(x.shape) if needs_dx else x.new_empty(0)), da, db


on_cuda(lora_sgmv_backward, lora_sgmv_backward_triton, reference.lora_sgmv_backward)


@lora_sgmv_backward.register_fake
def _lora_sgmv_backward_fake(dy, x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters, needs_dx=True):
    return _dx_like(x, needs_dx), torch.empty_like(a_bank), torch.empty_like(b_bank)


def _setup_sgmv(ctx, inputs, output):
    x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters = inputs
    ctx.save_for_backward(x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters)


def _backward_sgmv(ctx, dy):
    x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters = ctx.saved_tensors
    needs_dx = ctx.needs_input_grad[0]
    dx, da, db = lora_sgmv_backward(dy, x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters, needs_dx)
    return (dx if needs_dx else None), None, _dbias(ctx, dy, 2), da, db, None, None, None


torch.library.register_autograd("peftc::lora_sgmv", _backward_sgmv, setup_context=_setup_sgmv)


# -- routing: per-sequence adapter ids -> BGMV or SGMV -------------------------------------------

torch.library.define(
    "peftc::lora_multi",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor a_bank, Tensor b_bank, Tensor scales, Tensor seq_ids) -> Tensor")


def sequence_segments(seq_ids: Tensor, rows_per_seq: int) -> tuple[Tensor, Tensor]:
    """SGMV segments over the flattened rows: one per run of equal ids (sequence-major rows, no sort)."""
    adapters, counts = torch.unique_consecutive(seq_ids, return_counts=True)
    starts = torch.zeros(counts.numel() + 1, dtype=torch.long, device=seq_ids.device)
    starts[1:] = torch.cumsum(counts, 0) * rows_per_seq
    return starts, adapters


@torch.library.impl("peftc::lora_multi", "CompositeImplicitAutograd")
def lora_multi(x, weight, bias, a_bank, b_bank, scales, seq_ids):
    """x's rows, sequence-major, split evenly among seq_ids.numel() sequences ([B, S, K] or [B*S, K])."""
    rows = x.numel() // x.shape[-1]
    sequences = seq_ids.numel()
    if sequences == 0 or rows % sequences:
        raise ValueError(f"peftc::lora_multi: {rows} rows cannot be split among {sequences} adapter ids; "
                         "pass one adapter id per sequence (batch row) of the input")
    per_seq = rows // sequences
    eager = _eager_cpu(x, weight, a_bank, b_bank)
    if per_seq == 1:
        args = (x, weight, bias, a_bank, b_bank, scales, seq_ids)
        return _EagerBgmv.apply(*args) if eager else torch.ops.peftc.lora_bgmv(*args)
    starts, adapters = sequence_segments(seq_ids, per_seq)
    args = (x, weight, bias, a_bank, b_bank, scales, starts, adapters)
    return _EagerSgmv.apply(*args) if eager else torch.ops.peftc.lora_sgmv(*args)


_PLAIN = (Tensor, torch.nn.Parameter)  # not FakeTensor, FunctionalTensor or another subclass


def _eager_cpu(*tensors: Tensor) -> bool:
    """Plain CPU tensors run eagerly (no torch.compile, export, fake or functional tensors, dispatch mode):
    lora_multi then runs the torch path through the autograd Functions below, which compute exactly what
    peftc::lora_bgmv / lora_sgmv and their backward ops do, without the custom ops' dispatcher round trips
    (about 0.2 ms per site and step in a train_adapters step, 3% of it; measured A/B in one process)."""
    return (not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode()
            and all(type(t) in _PLAIN and t.device.type == "cpu" for t in tensors))


class _EagerBgmv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a_bank, b_bank, scales, idx):
        _setup_bgmv(ctx, (x, weight, bias, a_bank, b_bank, scales, idx), None)
        return reference.lora_bgmv(x, weight, bias, a_bank, b_bank, scales, idx)

    @staticmethod
    def backward(ctx, dy):
        x, weight, a_bank, b_bank, scales, idx = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        dx, da, db = reference.lora_bgmv_backward(dy, x, weight, a_bank, b_bank, scales, idx, needs_dx)
        return (dx if needs_dx else None), None, _dbias(ctx, dy, 2), da, db, None, None


class _EagerSgmv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
        _setup_sgmv(ctx, (x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters), None)
        return reference.lora_sgmv(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters)

    @staticmethod
    def backward(ctx, dy):
        x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        dx, da, db = reference.lora_sgmv_backward(dy, x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters,
                                                  needs_dx)
        return (dx if needs_dx else None), None, _dbias(ctx, dy, 2), da, db, None, None, None


# -- gathered LoRA: the export form (plain gathers and batched matmuls, no data-dependent shapes) ----

torch.library.define(
    "peftc::lora_gather",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor a_bank, Tensor b_bank, Tensor scales, Tensor seq_ids) -> Tensor")


@torch.library.impl("peftc::lora_gather", "CompositeImplicitAutograd")
def lora_gather(x, weight, bias, a_bank, b_bank, scales, seq_ids):
    """lora_multi's result with each sequence's A, B and scale gathered (id -1: scale 0). Exporters
    decompose it into Gather and MatMul; it copies A and B per sequence, so it is for export only."""
    y = torch.nn.functional.linear(x, weight, bias)
    sequences = seq_ids.numel()
    rows = x.reshape(sequences, -1, x.shape[-1]).to(a_bank.dtype)  # float32 banks over a half base: cast up
    known = seq_ids.clamp(min=0)
    scale = (scales[known] * (seq_ids >= 0).to(scales.dtype))[:, None, None]
    h = torch.bmm(rows, a_bank[known].transpose(1, 2))
    delta = torch.bmm(h, b_bank[known].transpose(1, 2)) * scale
    return (y + delta.reshape(y.shape)).to(y.dtype)  # rounded once


# -- per-row vectors: elementwise adapters (IA3, DoRA's magnitude) gathered by adapter id --------

torch.library.define(
    "peftc::scale_rows",
    "(Tensor x, Tensor bank, Tensor seq_ids, Tensor? bias, Tensor? bias_bank) -> Tensor")


@torch.library.impl("peftc::scale_rows", "CompositeImplicitAutograd")
def scale_rows(x, bank, seq_ids, bias, bias_bank):
    """x ⊙ bank[id] per sequence; bank [n+1, F], its last row the base's. With `bias`, x already holds
    it and the bias ends up scaled by bias_bank[id] instead (None: unscaled, DoRA's bias):
    x ⊙ bank[id] + bias ⊙ (bias_bank[id] - bank[id]). Rows whose two factors agree (IA3's, ones) are
    then x ⊙ bank[id] alone, rounded once as their own compiled model rounds.

    x's rows are sequence-major and split evenly among seq_ids.numel() sequences, as lora_multi's.
    A float32 bank over a half-precision x computes in float32 and returns x's dtype."""
    sequences = seq_ids.numel()
    features = x.shape[-1]
    factor = bank[seq_ids]
    rows = x.reshape(sequences, -1, features) * factor.unsqueeze(1)
    if bias is not None:
        bias_factor = 1.0 if bias_bank is None else bias_bank[seq_ids]
        rows = rows + (bias * (bias_factor - factor)).unsqueeze(-2)
    return rows.reshape(x.shape).to(x.dtype)


# -- per-row bottleneck adapters -----------------------------------------------------------------

torch.library.define(
    "peftc::bottleneck_rows",
    "(Tensor h, Tensor down, Tensor down_bias, Tensor up, Tensor up_bias, Tensor scales, Tensor seq_ids, "
    "str activation) -> Tensor")

_ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
                "tanh": torch.tanh}


@torch.library.impl("peftc::bottleneck_rows", "CompositeImplicitAutograd")
def bottleneck_rows(h, down, down_bias, up, up_bias, scales, seq_ids, activation):
    """Per sequence b with adapter a = seq_ids[b]: s[a] (up[a] act(down[a] h + down_bias[a]) + up_bias[a]);
    zero for id -1 (the base). Banks are gathered per sequence, so each row reads only its adapter."""
    sequences = seq_ids.numel()
    rows = h.reshape(sequences, -1, h.shape[-1]).to(down.dtype)  # the delta in the banks' dtype
    known = seq_ids.clamp(min=0)
    scale = (scales[known] * (seq_ids >= 0).to(scales.dtype))[:, None, None]
    hidden = _ACTIVATIONS[activation](torch.bmm(rows, down[known].transpose(1, 2)) + down_bias[known][:, None])
    delta = (torch.bmm(hidden, up[known].transpose(1, 2)) + up_bias[known][:, None]) * scale
    return delta.reshape(*h.shape[:-1], up.shape[1])

"""Multi-adapter LoRA kernels (Punica-style): BGMV for decode, SGMV for prefill.

Adapters are stacked in banks A[n, r, K], B[n, N, r] with a per-adapter scale s[n] (adapters
of smaller rank are zero-padded to r). BGMV: row i uses adapter idx[i]; idx[i] = -1 means the
base alone. SGMV: rows seg_starts[j] .. seg_starts[j+1]-1 share adapter seg_adapters[j] (-1 the
base), so each segment is a small dense matmul (tl.dot) instead of per-row dot products.
Both add the delta in place onto y, which holds the base output (a cuBLAS matmul).
A float32 bank over half-precision x (the spec's adapter_dtype) keeps the shrink's result h in float32
and the SGMV dot in float32, and y + delta is rounded once to y's dtype in the expand kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BGMV_BLOCK_K = 64
BGMV_BLOCK_N = 64
SGMV_BLOCKS = {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32}


@triton.jit
def bgmv_shrink_kernel(x_ptr, a_ptr, idx_ptr, h_ptr, K, R, stride_xm, stride_an, stride_ar, stride_ak,
                       stride_hm, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    adapter = tl.load(idx_ptr + row)
    live_r = tl.where(adapter >= 0, R, 0)  # scalar masks: -1 rows read nothing (and store zeros)
    adapter = tl.maximum(adapter, 0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < live_r
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + row * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + adapter * stride_an + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + row * stride_hm + offs_r, acc.to(h_ptr.dtype.element_ty), mask=offs_r < R)


@triton.jit
def bgmv_expand_kernel(h_ptr, b_ptr, s_ptr, idx_ptr, y_ptr, N, R, stride_hm, stride_bn_adapter, stride_bn,
                       stride_br, stride_ym, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    adapter = tl.load(idx_ptr + row)
    live_n = tl.where(adapter >= 0, N, 0)  # -1 rows leave y untouched
    adapter = tl.maximum(adapter, 0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    mask_n = offs_n < live_n
    h = tl.load(h_ptr + row * stride_hm + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + adapter * stride_bn_adapter + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    delta = tl.sum(b * h[None, :], axis=1) * tl.load(s_ptr + adapter).to(tl.float32)
    y_ptrs = y_ptr + row * stride_ym + offs_n
    y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def sgmv_shrink_kernel(x_ptr, a_ptr, starts_ptr, adapters_ptr, h_ptr, K, R, stride_xm, stride_an, stride_ar,
                       stride_ak, stride_hm, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                       WIDE_BANK: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    adapter = tl.load(adapters_ptr + seg)
    live_r = tl.where(adapter >= 0, R, 0)
    adapter = tl.maximum(adapter, 0)
    offs_m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < live_r
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptr + adapter * stride_an + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if WIDE_BANK:  # float32 adapters over a half-precision x: the adapter's part in float32
            acc = tl.dot(x.to(tl.float32), a.to(tl.float32), acc)
        else:
            acc = tl.dot(x, a.to(x.dtype), acc)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :], acc.to(h_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_r < R)[None, :])


@triton.jit
def sgmv_expand_kernel(h_ptr, b_ptr, s_ptr, starts_ptr, adapters_ptr, y_ptr, N, R, stride_hm, stride_bn_adapter,
                       stride_bn, stride_br, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr):
    seg = tl.program_id(0)
    start = tl.load(starts_ptr + seg)
    end = tl.load(starts_ptr + seg + 1)
    adapter = tl.load(adapters_ptr + seg)
    live_end = tl.where(adapter >= 0, end, start)  # a -1 segment leaves y untouched
    adapter = tl.maximum(adapter, 0)
    offs_m = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < live_end
    mask_n = offs_n < N
    mask_r = offs_r < R
    h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                other=0.0)
    b = tl.load(b_ptr + adapter * stride_bn_adapter + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    delta = tl.dot(h, b.to(h.dtype)) * tl.load(s_ptr + adapter).to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


# A bank is read through (adapter, rank, feature) strides, so the backward reuses the forward
# kernels on transposed views: dy B[a] is a shrink over B's [N, r] read as [r, N], and
# s (dy B[a]) A[a] is an expand over A's [r, K] read as [K, r]. No bank is copied.

def a_strides(a_bank: torch.Tensor) -> tuple[int, int, int]:
    """A[n, r, K] as the shrink reads it: (adapter, rank, input feature)."""
    return a_bank.stride(0), a_bank.stride(1), a_bank.stride(2)


def b_strides(b_bank: torch.Tensor) -> tuple[int, int, int]:
    """B[n, N, r] as the expand reads it: (adapter, output feature, rank)."""
    return b_bank.stride(0), b_bank.stride(1), b_bank.stride(2)


def b_as_shrink(b_bank: torch.Tensor) -> tuple[int, int, int]:
    """B[n, N, r] read as a shrink bank [n, r, N]: u = dy B[a]."""
    return b_bank.stride(0), b_bank.stride(2), b_bank.stride(1)


def a_as_expand(a_bank: torch.Tensor) -> tuple[int, int, int]:
    """A[n, r, K] read as an expand bank [n, K, r]: dx += s u A[a]."""
    return a_bank.stride(0), a_bank.stride(2), a_bank.stride(1)


def _h_dtype(x2: torch.Tensor, bank: torch.Tensor) -> torch.dtype:
    """The shrink result's dtype: the wider of x's and the bank's (float32 adapters over a half x)."""
    return torch.promote_types(x2.dtype, bank.dtype)


def bgmv_shrink(x2, bank, strides, rank: int, idx32) -> torch.Tensor:
    """h[i] = x2_i bank[idx_i]^T ([M, rank]; zeros on -1 rows). x2 row-contiguous."""
    m, k = x2.shape
    h = x2.new_empty(m, rank, dtype=_h_dtype(x2, bank))
    bgmv_shrink_kernel[(m,)](x2, bank, idx32, h, k, rank, x2.stride(0), *strides, h.stride(0),
                             BLOCK_K=BGMV_BLOCK_K, BLOCK_R=_block_r(rank))
    return h


def bgmv_expand_(y2, h, bank, strides, scales, idx32) -> torch.Tensor:
    """y2[i] += s[idx_i] h_i bank[idx_i]^T, for idx_i >= 0."""
    m, n = y2.shape
    rank = h.shape[1]
    grid = (m, triton.cdiv(n, BGMV_BLOCK_N))
    bgmv_expand_kernel[grid](h, bank, scales, idx32, y2, n, rank, h.stride(0), *strides, y2.stride(0),
                             BLOCK_N=BGMV_BLOCK_N, BLOCK_R=_block_r(rank))
    return y2


def bgmv_add_(y2: torch.Tensor, x2: torch.Tensor, a_bank: torch.Tensor, b_bank: torch.Tensor,
              scales: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y2[i] += s[idx_i] (x2_i A[idx_i]^T) B[idx_i]^T for idx_i >= 0; y2, x2 row-contiguous [M, *]."""
    idx32 = idx.to(torch.int32)
    h = bgmv_shrink(x2, a_bank, a_strides(a_bank), a_bank.shape[1], idx32)
    return bgmv_expand_(y2, h, b_bank, b_strides(b_bank), scales, idx32)


def bgmv_backward(dy2, x2, dx2, a_bank, b_bank, scales, idx) -> tuple[torch.Tensor, torch.Tensor]:
    """dx2 += s (dy2 B[idx]) A[idx] in place; returns (u = dy2 B[idx], h = x2 A[idx]^T) for dA / dB."""
    idx32 = idx.to(torch.int32)
    rank = a_bank.shape[1]
    u = bgmv_shrink(dy2, b_bank, b_as_shrink(b_bank), rank, idx32)
    bgmv_expand_(dx2, u, a_bank, a_as_expand(a_bank), scales, idx32)
    return u, bgmv_shrink(x2, a_bank, a_strides(a_bank), rank, idx32)


class Segments:
    """An SGMV segment table on the device, with the grid size its launches need (one host sync)."""

    def __init__(self, seg_starts: torch.Tensor, seg_adapters: torch.Tensor):
        self.starts, self.adapters = seg_starts.to(torch.int32), seg_adapters.to(torch.int32)
        self.count = seg_adapters.numel()
        self.longest = int((seg_starts[1:] - seg_starts[:-1]).max()) if self.count else 0

    @property
    def empty(self) -> bool:
        return self.count == 0 or self.longest <= 0

    def grid(self, *more: int) -> tuple[int, ...]:
        return (self.count, triton.cdiv(self.longest, SGMV_BLOCKS["BLOCK_M"]), *more)


def sgmv_shrink(x2, bank, strides, rank: int, seg: Segments) -> torch.Tensor:
    """h[rows of segment j] = x2 bank[adapter_j]^T ([M, rank]; zeros outside live segments)."""
    m, k = x2.shape
    h = x2.new_zeros(m, rank, dtype=_h_dtype(x2, bank))
    bm, bk = SGMV_BLOCKS["BLOCK_M"], SGMV_BLOCKS["BLOCK_K"]
    sgmv_shrink_kernel[seg.grid()](x2, bank, seg.starts, seg.adapters, h, k, rank, x2.stride(0), *strides,
                                   h.stride(0), BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=_block_r(rank),
                                   WIDE_BANK=h.dtype != x2.dtype)
    return h


def sgmv_expand_(y2, h, bank, strides, scales, seg: Segments) -> torch.Tensor:
    """y2[rows of segment j] += s h bank[adapter_j]^T, for adapter_j >= 0."""
    n, rank = y2.shape[1], h.shape[1]
    bm, bn = SGMV_BLOCKS["BLOCK_M"], SGMV_BLOCKS["BLOCK_N"]
    sgmv_expand_kernel[seg.grid(triton.cdiv(n, bn))](
        h, bank, scales, seg.starts, seg.adapters, y2, n, rank, h.stride(0), *strides, y2.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=_block_r(rank))
    return y2


def sgmv_add_(y2: torch.Tensor, x2: torch.Tensor, a_bank: torch.Tensor, b_bank: torch.Tensor,
              scales: torch.Tensor, seg_starts: torch.Tensor, seg_adapters: torch.Tensor) -> torch.Tensor:
    """SGMV: y2[rows of segment j] += s (x A^T) B^T with adapter seg_adapters[j] (-1: nothing)."""
    seg = Segments(seg_starts, seg_adapters)
    if seg.empty:
        return y2
    h = sgmv_shrink(x2, a_bank, a_strides(a_bank), a_bank.shape[1], seg)
    return sgmv_expand_(y2, h, b_bank, b_strides(b_bank), scales, seg)


def sgmv_backward(dy2, x2, dx2, a_bank, b_bank, scales, seg_starts, seg_adapters):
    """dx2 += s (dy2 B[a]) A[a] per segment, in place; returns (u, h) as bgmv_backward does."""
    seg = Segments(seg_starts, seg_adapters)
    rank = a_bank.shape[1]
    if seg.empty:
        zeros = x2.new_zeros(x2.shape[0], rank)
        return zeros, zeros
    u = sgmv_shrink(dy2, b_bank, b_as_shrink(b_bank), rank, seg)
    sgmv_expand_(dx2, u, a_bank, a_as_expand(a_bank), scales, seg)
    return u, sgmv_shrink(x2, a_bank, a_strides(a_bank), rank, seg)

"""Torch reference implementations of every kernel: the CPU path of the custom ops and the tests' oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear(x, weight, bias, a, b, scale, x_lora=None):
    """x W^T + bias + s (x_lora A^T) B^T, computed as the unfused graph would."""
    return with_adapter(F.linear(x, weight, bias), x, a, b, scale, x_lora)


def with_adapter(base, x, a, b, scale, x_lora=None):
    """base + s B(A(x_lora or x)): insert_lora's add(y, linear(linear(h, A), B), alpha=s), op for op."""
    return torch.add(base, F.linear(F.linear(x if x_lora is None else x_lora, a), b), alpha=scale)


def lora_linear_backward(dy, x, weight, a, b, scale, x_lora=None):
    """(dx, dx_lora or None, dA, dB) for y = lora_linear(x, W, bias, A, B, s, x_lora), W frozen."""
    dx_base = (dy.reshape(-1, dy.shape[-1]) @ weight).view(x.shape)
    return with_adapter_grads(dx_base, dy, x, a, b, scale, x_lora)


def with_adapter_grads(dx_base, dy, x, a, b, scale, x_lora=None):
    """(dx, dx_lora or None, dA, dB) given the base path's dx: adds the adapter branch's gradients.
    Without x_lora the adapter's input is x, and its gradient is folded into dx."""
    hx = x if x_lora is None else x_lora
    dy2, hx2 = dy.reshape(-1, dy.shape[-1]), hx.reshape(-1, hx.shape[-1])
    u = dy2 @ b
    dx_lora = ((u @ a) * scale).view(hx.shape)
    da = (u.t() @ hx2) * scale
    db = (dy2.t() @ (hx2 @ a.t())) * scale
    if x_lora is None:
        return dx_base + dx_lora, None, da, db
    return dx_base, dx_lora, da, db


def _compute_dtype(dtype: torch.dtype, bank_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """float32 for half types (as the kernels accumulate), wider if the input or the bank is (float64)."""
    return torch.promote_types(torch.promote_types(dtype, torch.float32), bank_dtype)


def live_slots(scales: torch.Tensor) -> list[bool]:
    """Which bank slots hold an adapter at this site. A slot with scale 0 (an adapter that does not
    target the site, or alpha 0) adds nothing and gets a zero gradient, so its rows skip the matmuls."""
    return scales.ne(0).tolist()


def adapter_groups(idx: torch.Tensor, scales: torch.Tensor | None = None) -> list[tuple[int, torch.Tensor]]:
    """(adapter, row indices) per adapter some row of `idx` uses; -1 rows belong to none (one host sync).
    With `scales`, adapters whose slot is empty (scale 0) are left out."""
    present = idx[idx >= 0].unique().tolist()
    live = [True] * (max(present) + 1 if present else 0) if scales is None else live_slots(scales)
    return [(a, (idx == a).nonzero().squeeze(1)) for a in present if live[a]]


def segment_groups(seg_starts: torch.Tensor, seg_adapters: torch.Tensor,
                   scales: torch.Tensor | None = None) -> list[tuple[int, slice]]:
    """(adapter, row slice) per non-empty, non-base segment of an SGMV segment table (one host sync).
    With `scales`, segments of empty slots (scale 0) are left out."""
    starts, adapters = seg_starts.tolist(), seg_adapters.tolist()
    live = None if scales is None else live_slots(scales)
    return [(a, slice(starts[j], starts[j + 1])) for j, a in enumerate(adapters)
            if a >= 0 and starts[j + 1] > starts[j] and (live is None or live[a])]


def add_grouped_(y2, x2, a_bank, b_bank, scales, groups):
    """y2[rows] += s[a] (x A[a]^T) B[a]^T for each (adapter a, rows) group: one matmul pair per group,
    the torch analogue of SGMV (and how PEFT runs mixed batches). The scale multiplies the [rows, r]
    product, and where the rows are a slice (SGMV's segments) the expand accumulates in place.
    Over a half-precision base, the base rows are cast up and the sum rounded once (`_add_rounded_once`)."""
    ct = _compute_dtype(x2.dtype, a_bank.dtype)
    for adapter, rows in groups:
        if ct != y2.dtype:
            y2[rows] = _add_rounded_once(y2[rows], x2[rows], a_bank[adapter], b_bank[adapter], scales[adapter], ct)
            continue
        h = (x2[rows].to(ct) @ a_bank[adapter].to(ct).t()) * scales[adapter].to(ct)
        if isinstance(rows, slice):
            y2[rows].addmm_(h, b_bank[adapter].to(ct).t())
        else:
            y2[rows] += h @ b_bank[adapter].to(ct).t()
    return y2


def _add_rounded_once(y, x, a, b, scale, ct):
    """y + s B(A x) with the adapter's part in `ct` and one rounding to y's dtype: the op order of the
    adapter's own compiled branch over a half-precision base (passes/cast_adapter_dtype.py), so a served
    row equals its own model."""
    delta = (x.to(ct) @ a.to(ct).t()) @ b.to(ct).t()
    return torch.add(y.to(ct), delta, alpha=float(scale)).to(y.dtype)


def lora_delta_bgmv(x2, a_bank, b_bank, scales, idx):
    """Per row i: s[idx_i] (x_i A[idx_i]^T) B[idx_i]^T, zero where idx_i < 0. x2: [M, K]; in the
    compute dtype (float32 over a half-precision x), for the caller to add before rounding.

    The torch analogue of BGMV: each row gathers its adapter's A and B and two batched matvecs
    follow, a fixed handful of ops however many adapters the batch mixes (decode batches are small,
    so the gathered [M, r, K] / [M, N, r] copies are too).
    """
    ct = _compute_dtype(x2.dtype, a_bank.dtype)
    safe = idx.clamp_min(0).long()
    # [M, 1, K] @ [M, K, r] then [M, 1, r] @ [M, r, N]: row-vector bmm, which CPU BLAS runs far
    # faster than the matrix-times-column form on these shapes
    h = torch.bmm(x2.to(ct)[:, None, :], a_bank.index_select(0, safe).to(ct).transpose(1, 2))
    delta = torch.bmm(h, b_bank.index_select(0, safe).to(ct).transpose(1, 2)).squeeze(1)
    live_scale = torch.where(idx >= 0, scales[safe].to(ct), torch.zeros((), dtype=ct, device=x2.device))
    return delta * live_scale[:, None]


def segment_indices(seg_starts: torch.Tensor, seg_adapters: torch.Tensor, rows: int) -> torch.Tensor:
    """The per-row adapter index of an SGMV segment table (rows outside every segment: -1)."""
    idx = torch.full((rows,), -1, dtype=torch.long, device=seg_starts.device)
    for s in range(seg_adapters.numel()):
        idx[int(seg_starts[s]): int(seg_starts[s + 1])] = int(seg_adapters[s])
    return idx


ROWS_PER_GROUP = 4  # gathering copies each row's A and B: worth it only when adapters have few rows each


def lora_bgmv(x, weight, bias, a_bank, b_bank, scales, idx):
    x2 = x.reshape(-1, x.shape[-1])
    y2 = F.linear(x2, weight, bias)
    groups = adapter_groups(idx, scales)
    if x2.shape[0] >= ROWS_PER_GROUP * len(groups):  # e.g. one adapter for the whole batch
        y2 = add_grouped_(y2, x2, a_bank, b_bank, scales, groups)
    else:
        delta = lora_delta_bgmv(x2, a_bank, b_bank, scales, idx)
        y2 = (y2.to(delta.dtype) + delta).to(y2.dtype)  # one rounding over a half-precision base
    return y2.view(*x.shape[:-1], weight.shape[0])


def lora_sgmv(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
    x2 = x.reshape(-1, x.shape[-1])
    groups = segment_groups(seg_starts, seg_adapters, scales)
    y2 = add_grouped_(F.linear(x2, weight, bias), x2, a_bank, b_bank, scales, groups)
    return y2.view(*x.shape[:-1], weight.shape[0])


def bank_grads(dy2, x2, u, h, a_bank, b_bank, scales, groups):
    """dA[a] = s_a sum u_i^T x_i and dB[a] = s_a sum dy_i^T h_i over the rows of adapter a's groups,
    with u = dy B[a] and h = x A[a]^T per row; adapters no row uses get zeros. Grouped matmuls, the
    scale on the [rows, r] factor."""
    ct = _compute_dtype(x2.dtype)
    da = torch.zeros(a_bank.shape, dtype=ct, device=a_bank.device)
    db = torch.zeros(b_bank.shape, dtype=ct, device=b_bank.device)
    for adapter, rows in groups:
        s = scales[adapter].to(ct)
        da[adapter] += (u[rows].to(ct) * s).t() @ x2[rows].to(ct)
        db[adapter] += dy2[rows].to(ct).t() @ (h[rows].to(ct) * s)
    return da.to(a_bank.dtype), db.to(b_bank.dtype)


def lora_multi_backward(dy, x, weight, a_bank, b_bank, scales, groups, needs_dx=True):
    """(dx, dA_bank, dB_bank) of y = x W^T + b + per-group LoRA deltas; W frozen, scales constant.
    Per group u = s dy B[a] and h = x A[a]^T ([rows, r]): dx[rows] += u A[a], dA[a] += u^T x,
    dB[a] += dy^T h s, accumulated in place; adapters no live group uses keep zero gradients.
    needs_dx=False (the op's input needs no gradient) skips dx = dy W, returning an empty dx."""
    ct = _compute_dtype(x.dtype)
    x2, dy2 = x.reshape(-1, x.shape[-1]).to(ct), dy.reshape(-1, dy.shape[-1]).to(ct)
    dx = dy2 @ weight.to(ct) if needs_dx else None
    da = torch.zeros(a_bank.shape, dtype=ct, device=a_bank.device)
    db = torch.zeros(b_bank.shape, dtype=ct, device=b_bank.device)
    for adapter, rows in groups:
        a, b, s = a_bank[adapter].to(ct), b_bank[adapter].to(ct), scales[adapter].to(ct)
        x_rows, dy_rows = x2[rows], dy2[rows]
        u = (dy_rows @ b) * s
        if dx is not None and isinstance(rows, slice):
            dx[rows].addmm_(u, a)
        elif dx is not None:
            dx[rows] += u @ a
        da[adapter].addmm_(u.t(), x_rows)
        db[adapter].addmm_(dy_rows.t(), (x_rows @ a.t()) * s)
    dx = x.new_empty(0) if dx is None else dx.to(x.dtype).view(x.shape)
    return dx, da.to(a_bank.dtype), db.to(b_bank.dtype)


def lora_bgmv_backward(dy, x, weight, a_bank, b_bank, scales, idx, needs_dx=True):
    return lora_multi_backward(dy, x, weight, a_bank, b_bank, scales, adapter_groups(idx, scales), needs_dx)


def lora_sgmv_backward(dy, x, weight, a_bank, b_bank, scales, seg_starts, seg_adapters, needs_dx=True):
    groups = segment_groups(seg_starts, seg_adapters, scales)
    return lora_multi_backward(dy, x, weight, a_bank, b_bank, scales, groups, needs_dx)

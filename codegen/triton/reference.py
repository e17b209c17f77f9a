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


def lora_delta_bgmv(x2, a_bank, b_bank, scales, idx):
    """Per row i: s[idx_i] (x_i A[idx_i]^T) B[idx_i]^T, zero where idx_i < 0. x2: [M, K]."""
    safe = idx.clamp_min(0).long()
    h = torch.einsum("mk,mrk->mr", x2.float(), a_bank[safe].float()).to(x2.dtype)
    delta = torch.einsum("mr,mnr->mn", h.float(), b_bank[safe].float()) * scales[safe].float()[:, None]
    return torch.where((idx >= 0)[:, None], delta, torch.zeros_like(delta)).to(x2.dtype)


def segment_indices(seg_starts: torch.Tensor, seg_adapters: torch.Tensor, rows: int) -> torch.Tensor:
    """The per-row adapter index of an SGMV segment table (rows outside every segment: -1)."""
    idx = torch.full((rows,), -1, dtype=torch.long, device=seg_starts.device)
    for s in range(seg_adapters.numel()):
        idx[int(seg_starts[s]): int(seg_starts[s + 1])] = int(seg_adapters[s])
    return idx


def lora_bgmv(x, weight, bias, a_bank, b_bank, scales, idx):
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias) + lora_delta_bgmv(x2, a_bank, b_bank, scales, idx)
    return y.view(*x.shape[:-1], weight.shape[0])


def lora_sgmv(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
    x2 = x.reshape(-1, x.shape[-1])
    idx = segment_indices(seg_starts, seg_adapters, x2.shape[0])
    return lora_bgmv(x, weight, bias, a_bank, b_bank, scales, idx)

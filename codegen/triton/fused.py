"""Launchers for the fused LoRA linear: forward y = x W^T + s (x A^T) B^T (+ bias) and its backward.

`x_lora` is the adapter branch's input when it differs from the base's (LoRA dropout in
training); it forces the two-launch form (shrink, then base matmul with the expand fused in).
Without it, small token counts use the one-launch form (the shrink rides in the K loop) and
large ones the two-launch form, which avoids recomputing x A^T for every output block.
"""

from __future__ import annotations

import torch

from .kernels import Weight, launch

# Rows at which the separate shrink wins: every output-column block of the one-launch form
# recomputes x A^T (r / BLOCK_P extra FLOPs), which only pays off while launches dominate.
# A heuristic, not yet measured on a GPU (benchmarks/kernels.py measures both forms).
SHRINK_FIRST_ROWS = 256
# Tokens per split of the adapter-gradient reductions (dA, dB); also a guess until measured.
ROWS_PER_SPLIT = 1024
MAX_SPLIT = 32


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def shrink(x2: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x2 @ A^T: [M, r]."""
    return launch(x2, Weight(a), x2.new_empty(x2.shape[0], a.shape[0]))


def lora_linear_forward(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None, a: torch.Tensor,
                        b: torch.Tensor, scale: float, x_lora: torch.Tensor | None = None,
                        shrink_first: bool | None = None) -> torch.Tensor:
    x2 = _rows(x)
    out = x2.new_empty(x2.shape[0], weight.out_features)
    if shrink_first is None:
        shrink_first = x_lora is not None or x2.shape[0] >= SHRINK_FIRST_ROWS
    if x_lora is not None or shrink_first:
        h = shrink(_rows(x_lora if x_lora is not None else x), a)
        launch(x2, weight, out, h=h, b=b, scale=scale, bias=bias)
    else:
        launch(x2, weight, out, a=a, b=b, scale=scale, bias=bias)
    return out.view(*x.shape[:-1], weight.out_features)


def lora_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: Weight, a: torch.Tensor, b: torch.Tensor,
                         scale: float, x_lora: torch.Tensor | None = None, split: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx, dx_lora or None, dA, dB). With x_lora, dx is the base path's part only.

    `split`: how many programs share the token reduction of dA and dB (default: by token count).
    """
    dy2, x2 = _rows(dy), _rows(x)
    if split is None:
        split = max(1, min(MAX_SPLIT, x2.shape[0] // ROWS_PER_SPLIT))
    hx2 = _rows(x_lora) if x_lora is not None else x2
    m, k = x2.shape
    u = launch(dy2, Weight(b.t()), dy2.new_empty(m, b.shape[1]))  # dy B: [M, r]
    dx = x2.new_empty(m, k)
    dx_lora = None
    if x_lora is None:
        launch(dy2, weight, dx, trans_w=True, h=u, b=a.t(), scale=scale)
    else:
        launch(dy2, weight, dx, trans_w=True)
        dx_lora = launch(u, Weight(a.t()), x2.new_empty(m, k), alpha=scale).view(x_lora.shape)
    h = shrink(hx2, a)
    da = launch(u.t(), Weight(hx2.t()), torch.empty_like(a), alpha=scale, split=split)  # s u^T x: [r, K]
    db = launch(dy2.t(), Weight(h.t()), torch.empty_like(b), alpha=scale, split=split)  # s dy^T h: [N, r]
    return dx.view(x.shape), dx_lora, da, db

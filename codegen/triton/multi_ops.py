"""Multi-adapter custom ops (Punica-style serving): one base, a bank of stacked LoRA adapters.

    peftc::lora_bgmv(x, weight, bias, A_bank, B_bank, scales, idx)      row i uses adapter idx[i] (decode)
    peftc::lora_sgmv(x, weight, bias, A_bank, B_bank, scales, seg_starts, seg_adapters)   segments (prefill)

Triton kernels (multi.py) on CUDA, the torch reference elsewhere; -1 means the base alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .ops import triton_ready


@torch.library.custom_op("peftc::lora_bgmv", mutates_args=())
def lora_bgmv(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_bank: Tensor, b_bank: Tensor, scales: Tensor,
              idx: Tensor) -> Tensor:
    return reference.lora_bgmv(x, weight, bias, a_bank, b_bank, scales, idx)


@lora_bgmv.register_kernel("cuda")
def _lora_bgmv_cuda(x, weight, bias, a_bank, b_bank, scales, idx):
    if not triton_ready(x.device):
        return reference.lora_bgmv(x, weight, bias, a_bank, b_bank, scales, idx)
    return lora_bgmv_triton(x, weight, bias, a_bank, b_bank, scales, idx)


def lora_bgmv_triton(x, weight, bias, a_bank, b_bank, scales, idx):
    from .multi import bgmv_add_

    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y2 = torch.nn.functional.linear(x2, weight, bias)
    bgmv_add_(y2, x2, a_bank.contiguous(), b_bank.contiguous(), scales, idx)
    return y2.view(*x.shape[:-1], weight.shape[0])


@lora_bgmv.register_fake
def _lora_bgmv_fake(x, weight, bias, a_bank, b_bank, scales, idx):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftc::lora_sgmv", mutates_args=())
def lora_sgmv(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_bank: Tensor, b_bank: Tensor, scales: Tensor,
              seg_starts: Tensor, seg_adapters: Tensor) -> Tensor:
    return reference.lora_sgmv(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters)


@lora_sgmv.register_kernel("cuda")
def _lora_sgmv_cuda(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
    if not triton_ready(x.device):
        return reference.lora_sgmv(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters)
    return lora_sgmv_triton(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters)


def lora_sgmv_triton(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
    from .multi import sgmv_add_

    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y2 = torch.nn.functional.linear(x2, weight, bias)
    sgmv_add_(y2, x2, a_bank.contiguous(), b_bank.contiguous(), scales, seg_starts, seg_adapters)
    return y2.view(*x.shape[:-1], weight.shape[0])


@lora_sgmv.register_fake
def _lora_sgmv_fake(x, weight, bias, a_bank, b_bank, scales, seg_starts, seg_adapters):
    return x.new_empty(*x.shape[:-1], weight.shape[0])

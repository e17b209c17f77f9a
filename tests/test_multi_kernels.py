"""The multi-adapter kernels (BGMV, SGMV) on CPU under TRITON_INTERPRET=1 against the torch reference."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules load

import pytest
import torch

from peftc.codegen.triton import multi_ops, reference
from test_triton_kernels import DTYPES, _close, _f32, _tensors


def _banks(n_adapters, k, n, r, dtype):
    g = torch.Generator().manual_seed(3)
    a_bank = (torch.randn(n_adapters, r, k, generator=g) * k ** -0.5).to(dtype)
    b_bank = (torch.randn(n_adapters, n, r, generator=g) * r ** -0.5).to(dtype)
    return a_bank, b_bank, torch.linspace(0.5, 2.0, n_adapters)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_bgmv(dtype, rank):
    m, k, n = 9, 70, 45
    x, w, bias, _, _ = _tensors(m, k, n, rank, dtype)
    a_bank, b_bank, scales = _banks(4, k, n, rank, dtype)
    idx = torch.tensor([0, 3, -1, 1, 1, 2, -1, 3, 0])
    y = multi_ops.lora_bgmv_triton(x, w, bias, a_bank, b_bank, scales, idx)
    want = reference.lora_bgmv(*_f32(x, w, bias, a_bank, b_bank), scales, idx)
    _close(y, want, dtype)
    base_rows = idx < 0
    _close(y[base_rows], torch.nn.functional.linear(*_f32(x[base_rows], w, bias)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgmv(dtype):
    m, k, n, r = 40, 37, 50, 8
    x, w, bias, _, _ = _tensors(m, k, n, r, dtype)
    a_bank, b_bank, scales = _banks(3, k, n, r, dtype)
    seg_starts = torch.tensor([0, 3, 3, 21, 22, 40])  # an empty segment, a 1-row one, one over a block
    seg_adapters = torch.tensor([2, 0, 1, -1, 0])
    y = multi_ops.lora_sgmv_triton(x, w, bias, a_bank, b_bank, scales, seg_starts, seg_adapters)
    _close(y, reference.lora_sgmv(*_f32(x, w, bias, a_bank, b_bank), scales, seg_starts, seg_adapters), dtype)


def test_sgmv_equals_bgmv_with_expanded_indices():
    x, w, bias, _, _ = _tensors(12, 20, 18, 4, torch.float32)
    a_bank, b_bank, scales = _banks(2, 20, 18, 4, torch.float32)
    starts, adapters = torch.tensor([0, 5, 12]), torch.tensor([1, 0])
    idx = reference.segment_indices(starts, adapters, 12)
    _close(multi_ops.lora_sgmv_triton(x, w, bias, a_bank, b_bank, scales, starts, adapters),
           multi_ops.lora_bgmv_triton(x, w, bias, a_bank, b_bank, scales, idx), torch.float32)


def test_opcheck_multi_adapter_ops():
    x, w, bias, _, _ = _tensors(6, 10, 7, 3, torch.float32)
    a_bank, b_bank, scales = _banks(2, 10, 7, 3, torch.float32)
    torch.library.opcheck(multi_ops.lora_bgmv, (x, w, bias, a_bank, b_bank, scales,
                                                torch.tensor([0, 1, -1, 1, 0, 0])))
    torch.library.opcheck(multi_ops.lora_sgmv, (x, w, None, a_bank, b_bank, scales, torch.tensor([0, 2, 6]),
                                                torch.tensor([1, -1])))

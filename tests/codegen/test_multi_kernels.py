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


# -- backward, routing ----------------------------------------------------------------------------

def _per_row(x, w, bias, a_bank, b_bank, scales, idx):
    """The oracle: each row through plain linear ops with its own adapter (autograd gives every gradient)."""
    rows = []
    for i, adapter in enumerate(idx.tolist()):
        y = torch.nn.functional.linear(x[i], w, bias)
        if adapter >= 0:
            y = y + (x[i] @ a_bank[adapter].t() @ b_bank[adapter].t()) * scales[adapter]
        rows.append(y)
    return torch.stack(rows)


def _oracle_grads(dy, x, w, bias, a_bank, b_bank, scales, idx):
    leaves = [t.detach().double().requires_grad_() for t in (x, bias, a_bank, b_bank)]
    _per_row(leaves[0], w.double(), leaves[1], leaves[2], leaves[3], scales.double(), idx).backward(dy.double())
    return [t.grad for t in leaves]


IDX = torch.tensor([0, 3, -1, 1, 1, 2, -1, 3, 0, 3, 3])  # every adapter, repeats, two base rows


def test_forward_reference_equals_per_row_oracle():
    x, w, bias, _, _ = _tensors(11, 13, 9, 3, torch.float64)
    a_bank, b_bank, scales = _banks(4, 13, 9, 3, torch.float64)
    torch.testing.assert_close(reference.lora_bgmv(x, w, bias, a_bank, b_bank, scales, IDX),
                               _per_row(x, w, bias, a_bank, b_bank, scales.double(), IDX))


@pytest.mark.parametrize("op", ["bgmv", "sgmv"])
def test_gradcheck_float64_torch_path(op):
    x, w, bias, _, _ = _tensors(7, 6, 5, 2, torch.float64)
    a_bank, b_bank, scales = _banks(3, 6, 5, 2, torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, bias, a_bank, b_bank)]
    if op == "bgmv":
        idx = torch.tensor([2, -1, 0, 0, 1, 2, -1])
        fn = lambda x_, b_, a_, bb_: multi_ops.lora_bgmv(x_, w, b_, a_, bb_, scales.double(), idx)  # noqa: E731
    else:
        starts, adapters = torch.tensor([0, 2, 2, 5, 7]), torch.tensor([1, 0, -1, 2])
        fn = lambda x_, b_, a_, bb_: multi_ops.lora_sgmv(x_, w, b_, a_, bb_, scales.double(), starts,  # noqa: E731
                                                         adapters)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("rank", [1, 8, 64])
def test_bgmv_backward_triton(rank):
    m, k, n = 11, 37, 29
    x, w, bias, _, _ = _tensors(m, k, n, rank, torch.float32)
    a_bank, b_bank, scales = _banks(4, k, n, rank, torch.float32)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(5))
    dx, da, db = multi_ops.lora_bgmv_backward_triton(dy, x, w, a_bank, b_bank, scales, IDX)
    want_dx, _, want_da, want_db = _oracle_grads(dy, x, w, bias, a_bank, b_bank, scales, IDX)
    for got, want in ((dx, want_dx), (da, want_da), (db, want_db)):
        _close(got, want, torch.float32)
    ref = reference.lora_bgmv_backward(dy, x, w, a_bank, b_bank, scales, IDX)
    for got, want in zip((dx, da, db), ref):
        _close(got, want, torch.float32)


@pytest.mark.parametrize("dtype, r", [(torch.float32, 1), (torch.float32, 8), (torch.float32, 64), (torch.float16, 8)])
def test_sgmv_backward_triton(dtype, r):
    m, k, n = 40, 37, 50
    x, w, bias, _, _ = _tensors(m, k, n, r, dtype)
    a_bank, b_bank, scales = _banks(3, k, n, r, dtype)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(5)).to(dtype)
    starts = torch.tensor([0, 3, 3, 21, 22, 40])  # an empty segment, a 1-row one, one over a block
    adapters = torch.tensor([2, 0, 1, -1, 0])
    got = multi_ops.lora_sgmv_backward_triton(dy, x, w, a_bank, b_bank, scales, starts, adapters)
    idx = reference.segment_indices(starts, adapters, m)
    want_dx, _, want_da, want_db = _oracle_grads(dy, x, w, bias, a_bank, b_bank, scales, idx)
    for g_, w_ in zip(got, (want_dx, want_da, want_db)):
        assert g_.dtype == dtype
        _close(g_, w_, dtype)


def test_base_rows_give_no_adapter_gradient():
    x, w, _, _, _ = _tensors(4, 10, 6, 4, torch.float32)
    a_bank, b_bank, scales = _banks(2, 10, 6, 4, torch.float32)
    idx = torch.tensor([-1, 1, -1, 1])
    dy = torch.ones(4, 6)
    for backward in (reference.lora_bgmv_backward, multi_ops.lora_bgmv_backward_triton):
        dx, da, db = backward(dy, x, w, a_bank, b_bank, scales, idx)
        assert da[0].abs().sum() == 0 and db[0].abs().sum() == 0  # adapter 0: only -1 rows
        torch.testing.assert_close(dx[idx < 0], (dy @ w)[idx < 0])


def test_opcheck_backward_ops_and_autograd():
    x, w, bias, _, _ = _tensors(6, 10, 7, 3, torch.float32)
    a_bank, b_bank, scales = _banks(2, 10, 7, 3, torch.float32)
    dy = torch.randn(6, 7)
    idx, starts, adapters = torch.tensor([0, 1, -1, 1, 0, 0]), torch.tensor([0, 2, 6]), torch.tensor([1, -1])
    torch.library.opcheck(multi_ops.lora_bgmv_backward, (dy, x, w, a_bank, b_bank, scales, idx))
    torch.library.opcheck(multi_ops.lora_sgmv_backward, (dy, x, w, a_bank, b_bank, scales, starts, adapters))
    grads = [t.clone().requires_grad_() for t in (x, bias, a_bank, b_bank)]
    torch.library.opcheck(multi_ops.lora_bgmv, (grads[0], w, grads[1], grads[2], grads[3], scales, idx))
    torch.library.opcheck(multi_ops.lora_sgmv, (grads[0], w, grads[1], grads[2], grads[3], scales, starts, adapters))


@pytest.mark.parametrize("seq", [1, 5], ids=["decode_bgmv", "prefill_sgmv"])
def test_lora_multi_routes_per_sequence(seq):
    batch, k, n = 6, 12, 10
    x = torch.randn(batch, seq, k, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, k, dtype=torch.float64)
    a_bank, b_bank, scales = _banks(3, k, n, 4, torch.float64)
    a_bank.requires_grad_()
    seq_ids = torch.tensor([2, 2, -1, 0, 0, 1])
    y = torch.ops.peftc.lora_multi(x, w, None, a_bank, b_bank, scales, seq_ids)
    idx = seq_ids.repeat_interleave(seq)
    want = _per_row(x.reshape(-1, k), w, None, a_bank, b_bank, scales.double(), idx).view(batch, seq, n)
    torch.testing.assert_close(y, want)
    assert torch.autograd.gradcheck(lambda a_: torch.ops.peftc.lora_multi(x, w, None, a_, b_bank, scales, seq_ids),
                                    (a_bank,))


def _routed(seq, x_grad):
    """lora_multi's inputs with an empty slot (adapter 1: non-zero tensors, scale 0), every id, a base row."""
    batch, k, n = 5, 6, 7
    x = torch.randn(batch, seq, k, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w, bias = torch.randn(n, k, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    a_bank, b_bank, scales = _banks(3, k, n, 2, torch.float64)
    scales = scales.double()
    scales[1] = 0.0
    leaves = [x.requires_grad_(x_grad), bias.requires_grad_(), a_bank.requires_grad_(), b_bank.requires_grad_()]
    return leaves, (w, scales, torch.tensor([2, 1, -1, 0, 2]))


@pytest.mark.parametrize("seq", [1, 3], ids=["bgmv", "sgmv"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no_dx"])
def test_eager_routing_equals_the_custom_ops_and_skips_empty_slots(seq, x_grad):
    """lora_multi on plain CPU tensors (its autograd Functions) against peftc::lora_bgmv / lora_sgmv with their
    registered autograd: the same output and gradients, an empty slot's gradient zero, no dx when x needs none."""
    (x, bias, a_bank, b_bank), (w, scales, seq_ids) = _routed(seq, x_grad)
    y = torch.ops.peftc.lora_multi(x, w, bias, a_bank, b_bank, scales, seq_ids)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [t for t in (x, bias, a_bank, b_bank) if t.requires_grad], dy)
    if seq == 1:
        want_y = multi_ops.lora_bgmv(x, w, bias, a_bank, b_bank, scales, seq_ids)
    else:
        starts, adapters = multi_ops.sequence_segments(seq_ids, seq)
        want_y = multi_ops.lora_sgmv(x, w, bias, a_bank, b_bank, scales, starts, adapters)
    want = torch.autograd.grad(want_y, [t for t in (x, bias, a_bank, b_bank) if t.requires_grad], dy)
    assert y.grad_fn.name() != want_y.grad_fn.name()  # two routes: the eager Function and the custom op
    torch.testing.assert_close(y, want_y)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_)
    da, db = got[-2:]
    assert da[1].abs().sum() == 0 and db[1].abs().sum() == 0 and da[0].abs().sum() > 0
    dx, _, _ = reference.lora_sgmv_backward(dy.reshape(-1, 7), x.detach().reshape(-1, 6), w, a_bank.detach(),
                                            b_bank.detach(), scales, torch.tensor([0, 5 * seq]),
                                            torch.tensor([0]), False)
    assert dx.numel() == 0  # needs_dx=False: dx = dy W is not computed


def test_traced_routing_keeps_the_custom_op():
    """Under a tracer (make_fx's dispatch mode) lora_multi records peftc::lora_sgmv, not the eager Function."""
    from torch.fx.experimental.proxy_tensor import make_fx

    (x, bias, a_bank, b_bank), (w, scales, seq_ids) = _routed(3, True)
    gm = make_fx(lambda *t: torch.ops.peftc.lora_multi(*t))(x.detach(), w, bias.detach(), a_bank.detach(),
                                                           b_bank.detach(), scales, seq_ids)
    assert torch.ops.peftc.lora_sgmv.default in {node.target for node in gm.graph.nodes}


def test_lora_multi_refuses_ids_that_do_not_split_the_rows():
    with pytest.raises(ValueError, match="one adapter id per sequence"):
        torch.ops.peftc.lora_multi(torch.randn(5, 4), torch.randn(3, 4), None, torch.randn(1, 2, 4),
                                   torch.randn(1, 3, 2), torch.ones(1), torch.tensor([0, 0]))


@pytest.mark.parametrize("idx", [torch.arange(8) % 8, torch.zeros(8, dtype=torch.long), torch.tensor([1] * 7 + [-1])],
                         ids=["gathered_rows", "one_group", "one_group_and_base"])
def test_bgmv_torch_paths_equal_per_row_oracle(idx):
    """The torch BGMV gathers per row (many adapters, few rows each) or groups (few adapters): same result."""
    x, w, bias, _, _ = _tensors(8, 13, 9, 3, torch.float64)
    a_bank, b_bank, scales = _banks(8, 13, 9, 3, torch.float64)
    torch.testing.assert_close(reference.lora_bgmv(x, w, bias, a_bank, b_bank, scales, idx),
                               _per_row(x, w, bias, a_bank, b_bank, scales.double(), idx))


def test_sequence_segments_drive_the_sgmv_kernel():
    """lora_multi's prefill routing (runs of equal per-sequence ids, no sort) through the Triton SGMV."""
    batch, seq, k, n = 5, 3, 20, 18
    x, w, bias, _, _ = _tensors(batch * seq, k, n, 4, torch.float32)
    a_bank, b_bank, scales = _banks(3, k, n, 4, torch.float32)
    seq_ids = torch.tensor([2, 2, -1, 0, 2])
    starts, adapters = multi_ops.sequence_segments(seq_ids, seq)
    assert starts.tolist() == [0, 6, 9, 12, 15] and adapters.tolist() == [2, -1, 0, 2]
    got = multi_ops.lora_sgmv_triton(x, w, bias, a_bank, b_bank, scales, starts, adapters)
    _close(got, _per_row(x, w, bias, a_bank, b_bank, scales, seq_ids.repeat_interleave(seq)), torch.float32)


@pytest.mark.parametrize("kernel", ["bgmv", "sgmv"])
def test_float32_banks_over_half_rows_round_once(kernel):
    """Float32 adapters over a half-precision base (spec adapter_dtype): the kernels keep the adapter's part
    in float32 and round y + delta once, as the torch path and each adapter's own compiled model do.
    float16 here: the interpreter truncates float32 -> bfloat16 stores (the GPU rounds to nearest)."""
    half = torch.float16
    m, k, n, r = 24, 40, 36, 8
    x, w, bias, _, _ = _tensors(m, k, n, r, half)
    a_bank, b_bank, scales = _banks(3, k, n, r, torch.float32)
    a_bank, b_bank = a_bank * 3, b_bank * 3  # a delta as large as the base output: its rounding shows
    idx = torch.tensor([0, 2, -1, 1] * 6)
    starts, adapters = torch.tensor([0, 7, 8, 24]), torch.tensor([2, -1, 0])
    if kernel == "bgmv":
        got = multi_ops.lora_bgmv_triton(x, w, bias, a_bank, b_bank, scales, idx)
    else:
        idx = reference.segment_indices(starts, adapters, m)
        got = multi_ops.lora_sgmv_triton(x, w, bias, a_bank, b_bank, scales, starts, adapters)
    base = torch.nn.functional.linear(x.float(), w.float(), bias.float()).to(half).float()  # the half matmul
    live = idx.clamp(min=0)
    delta = torch.einsum("mk,mrk,mnr->mn", x.float(), a_bank[live], b_bank[live]) * (scales[live] * (idx >= 0))[:, None]
    want = (base + delta).to(half)
    assert got.dtype == half
    torch.testing.assert_close(reference.lora_bgmv(x, w, bias, a_bank, b_bank, scales, idx).float(), want.float(),
                               atol=2e-3, rtol=1e-3)  # the torch path: float32 adapters, one rounding
    one_ulp = 2.0 ** -10 * want.float().abs().clamp(min=2.0 ** -6)
    assert ((got.float() - want.float()).abs() <= one_ulp).all()
    assert (got != want).float().mean() < 0.02  # rare one-ulp ties from the float32 sum order, no more

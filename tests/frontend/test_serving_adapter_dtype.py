"""Served adapters over a bfloat16 base keep their float32 dtype (spec adapter_dtype, PEFT's autocast_adapter_dtype).

The banks stay float32, each adapter's part is computed in float32 and the site's output rounded once, so a
served row equals its own compiled model, and PEFT's single-adapter forward, bit for bit. Banks in the base
dtype were off by up to 0.015 on these LLaMA logits (LoRA; 0.002-0.004 for DoRA, VeRA, IA3, bottleneck)."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, logits, randomize_adapters
from peft import LoraConfig, PeftModel
from peft_reference import save_random_peft_folders
from torch import nn

import peftc

BF16 = torch.bfloat16
ENTRIES = {  # every linear-site type the banks serve, on a small bfloat16 MLP (fast to capture)
    "lora": {"method": "lora", "targets": ["fc1", "fc2"], "r": 4, "alpha": 8},
    "vera": {"method": "vera", "targets": ["fc1"], "r": 4},
    "ia3": {"method": "ia3", "targets": ["fc1", "fc2"], "feedforward": ["fc2"]},
    "adapter": {"method": "adapter", "targets": ["fc1"], "bottleneck": 6, "activation": "gelu"},
    "dora": {"method": "dora", "targets": ["fc1", "fc2"], "r": 3, "alpha": 5},
}
ROWS = ["lora", "dora", None, "vera", "ia3", "adapter", "lora", "ia3"]
BATCH = len(ROWS)


class WideMLP(nn.Module):
    """LLaMA-sized outputs (64) over [batch, seq, 16] rows: seq > 1 takes SGMV, seq 1 BGMV."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.fc2 = nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 64)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def rows_input(seq: int) -> torch.Tensor:
    return torch.randn(BATCH, seq, 16, generator=torch.Generator().manual_seed(seq)).to(BF16)


@pytest.fixture(scope="module")
def served_mlp():
    """({name: own compiled model}, ServedModel) over one bfloat16 MLP."""
    own = {}
    for seed, (name, entry) in enumerate(ENTRIES.items()):
        own[name] = peftc.compile(WideMLP().to(BF16), {"adapters": [entry]}, example_inputs=(rows_input(5),))
        randomize_adapters(own[name], std=0.3, seed=seed)
        own[name].eval()
    return own, peftc.serve_adapters(WideMLP().to(BF16), own, example_inputs=(rows_input(5),))


def test_banks_keep_the_adapters_float32(served_mlp):
    own, mm = served_mlp
    assert {p.dtype for cm in own.values() for p in cm.adapter_state_dict().values()} == {torch.float32}
    banks = mm.banks()
    assert banks and {t.dtype for bank in banks.values() for t in (bank.A_bank, bank.B_bank)} == {torch.float32}
    vectors = [b for _, b in mm.compilation.adapter_root.named_buffers() if b.is_floating_point()]
    assert vectors and {b.dtype for b in vectors} == {torch.float32}  # IA3 / DoRA vectors, bottleneck banks


@pytest.mark.parametrize("seq", [5, 1], ids=["prefill_sgmv", "decode_bgmv"])
def test_each_row_equals_its_own_compiled_model(served_mlp, seq):
    own, mm = served_mlp
    x = rows_input(seq)
    with torch.no_grad():
        got = mm(x, adapter_ids=ROWS)
        assert got.dtype == BF16
        base = WideMLP().to(BF16)(x)
        for i, name in enumerate(ROWS):
            want = own[name](x)[i] if name else base[i]
            if name != "dora":
                assert torch.equal(got[i], want), (name, (got[i].float() - want.float()).abs().max())
            else:  # DoRA's served form factors m / ||W + sBA|| out of the sum: one more rounding
                assert (got[i].float() - want.float()).abs().max() <= 2.0 ** -7 * want.float().abs().max()
            assert name is None or not torch.equal(want, base[i])  # the adapter acts


# -- against PEFT on a bfloat16 LLaMA ----------------------------------------------------------------
PEFT_CONFIGS = {
    "sql": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "chat": LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "o_proj", "down_proj"], use_rslora=True),
}


def bf16_llama():
    return FAMILIES["llama"].build().to(BF16)


def test_lora_rows_equal_peft_and_its_mixed_batch_to_its_rounding(tmp_path):
    """PEFT's single-adapter forward rounds once, as the compiled model does (tests/frontend/test_adapter_dtype.py):
    each served row equals it exactly. PEFT's `adapter_names=` batch rounds each delta to bfloat16 before the
    add, so the served rows are no further from it than PEFT's own single-adapter forward is."""
    save_random_peft_folders(bf16_llama, PEFT_CONFIGS, tmp_path, seed=1, scale=0.3)
    pm = PeftModel.from_pretrained(bf16_llama(), tmp_path / "sql", adapter_name="sql")
    pm.load_adapter(tmp_path / "chat", adapter_name="chat")
    pm.eval()
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.float32}
    rows = ["sql", "chat", "__base__", "chat", "sql"]
    inputs = FAMILIES["llama"].inputs(len(rows), 6)
    mm = peftc.serve_adapters(bf16_llama(), {name: tmp_path / name for name in PEFT_CONFIGS}, example_kwargs=inputs)
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=[None if r == "__base__" else r for r in rows]))
        mixed = logits(pm(**inputs, adapter_names=rows))
        single = mixed.clone()
        for i, name in enumerate(rows):
            if name != "__base__":
                pm.set_adapter(name)
                single[i] = logits(pm(**inputs))[i]
    assert got.dtype == BF16
    assert torch.equal(got, single)
    peft_gap = (single.float() - mixed.float()).abs().max()
    assert 0 < (got.float() - mixed.float()).abs().max() <= peft_gap

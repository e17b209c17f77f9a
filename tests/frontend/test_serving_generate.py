"""Served models generate (issue 13 item 3): `mm.generate(ids, adapter_ids=[...])`, each row with its own adapter, over the
serving graphs with a StaticCache; rows checked against each adapter's own compiled model and against PEFT."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, compile_family_specs, logits, randomize_adapters
from generation_steps import generator_of, prefill_and_step
from peft_reference import save_random_peft_folders

import peftc

TOL = dict(atol=1e-5, rtol=1e-5)
GREEDY = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)  # no early stop: full rows
FAMILY = FAMILIES["llama"]
ENTRIES = {
    "lora": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8},
    "dora": {"method": "dora", "targets": ["q_proj", "down_proj"], "r": 2, "alpha": 3},
    "ia3": {"method": "ia3", "targets": ["k_proj", "down_proj"], "feedforward": ["down_proj"]},
    "adapter": {"method": "adapter", "targets": ["o_proj"], "bottleneck": 4},
}
ROWS = ["lora", None, "dora", "ia3", "adapter", "lora"]


def _prompt(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = FAMILY.inputs(batch, seq)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1::2, :2] = 0  # left padding on every other row, as transformers pads decoder-only prompts
    return ids, mask


@pytest.fixture(scope="module")
def served():
    inputs = FAMILY.inputs(2, 4)
    _, cms = compile_family_specs(FAMILY, {name: {"adapters": [entry]} for name, entry in ENTRIES.items()},
                                  example_kwargs=inputs)
    for seed, name in enumerate(ENTRIES):
        randomize_adapters(cms[name], std=0.4, seed=seed)
        cms[name].eval()
    return cms, peftc.serve_adapters(FAMILY.build(), cms, example_kwargs=inputs).eval()


def test_each_rows_tokens_equal_its_adapters_own_generate(served):
    cms, mm = served
    ids, mask = _prompt(len(ROWS), 5)
    got = mm.generate(ids, attention_mask=mask, adapter_ids=ROWS, **GREEDY)
    assert got.shape == (len(ROWS), 5 + GREEDY["max_new_tokens"])
    for name, cm in cms.items():
        rows = [i for i, r in enumerate(ROWS) if r == name]
        assert got[rows].tolist() == cm.generate(ids[rows], attention_mask=mask[rows], **GREEDY).tolist()
    base = FAMILY.build().eval()
    assert got[1].tolist() == base.generate(ids[1:2], attention_mask=mask[1:2], **GREEDY)[0].tolist()
    assert got[0, 5:].tolist() != got[1, 5:].tolist()  # the adapters act on what is generated


def test_prefill_and_decode_rows_equal_the_own_models_to_1e5(served):
    """The served generation graphs (prefill, then one decode step) against each own model's, row by row."""
    cms, mm = served
    ids, mask = _prompt(len(ROWS), 5)
    adapter_ids = mm.adapter_index(ROWS, len(ROWS))
    got = prefill_and_step(generator_of(mm), ids, mask, {"adapter_ids": adapter_ids})
    for name, cm in cms.items():
        rows = [i for i, r in enumerate(ROWS) if r == name]
        # each own model on its rows alone: the batch size its generate() above ran, so the graphs it built
        want = prefill_and_step(generator_of(cm), ids[rows], mask[rows], {})
        for got_part, want_part in zip(got, want):
            torch.testing.assert_close(got_part[rows], want_part, **TOL)


def test_peft_mixed_lora_generate_matches(tmp_path):
    """Two PEFT LoRA folders (different ranks and targets): PEFT's own mixed batch, generate(adapter_names=...)."""
    from peft import LoraConfig, PeftModel

    configs = {"a": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]),
               "b": LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"])}
    save_random_peft_folders(FAMILY.build, configs, tmp_path, seed=3)
    peft_model = PeftModel.from_pretrained(FAMILY.build(), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.eval()
    mm = peftc.serve_adapters(FAMILY.build(), {n: tmp_path / n for n in configs}, example_kwargs=FAMILY.inputs(2, 3))
    ids, mask = _prompt(4, 4)
    rows = ["a", "b", None, "b"]
    want = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=[r or "__base__" for r in rows],
                               **GREEDY)
    assert mm.generate(ids, attention_mask=mask, adapter_ids=rows, **GREEDY).tolist() == want.tolist()


def test_prompt_and_prefix_rows_generate_as_peft_decodes_greedily(tmp_path):
    """PEFT prompt and prefix folders: each row's tokens equal greedy decoding with PEFT's own forward (PEFT's
    generate() for prompt learning does not run correctly with this transformers version: its prefix cache and
    prompt positions are not the ones its forward uses), and the served forward's own greedy decoding."""
    from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType

    configs = {"prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
               "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
               "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])}
    save_random_peft_folders(FAMILY.build, configs, tmp_path, seed=3)
    mm = peftc.serve_adapters(FAMILY.build(), {n: tmp_path / n for n in configs}, example_kwargs=FAMILY.inputs(2, 3))
    ids = FAMILY.inputs(4, 5)["input_ids"]
    rows = ["prefix", "prompt", None, "lora"]
    got = mm.generate(ids, adapter_ids=rows, **GREEDY)
    assert got.shape == (4, 5 + GREEDY["max_new_tokens"])  # the prompt slots are not returned
    served_loop = _greedy(lambda seq: logits(mm(input_ids=seq, adapter_ids=rows)), ids)
    assert got.tolist() == served_loop.tolist()
    for i, name in enumerate(rows):
        own = PeftModel.from_pretrained(FAMILY.build(), tmp_path / name).eval() if name else FAMILY.build().eval()
        want = _greedy(lambda seq: logits(own(input_ids=seq, use_cache=False)), ids[i:i + 1])
        assert got[i].tolist() == want[0].tolist(), name


def _greedy(step, ids: torch.Tensor) -> torch.Tensor:
    """Greedy decoding without a cache: the whole sequence through `step` for every new token."""
    with torch.no_grad():
        for _ in range(GREEDY["max_new_tokens"]):
            ids = torch.cat([ids, step(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@torch.no_grad()
def test_a_forward_with_a_cache_gives_each_row_its_own_models_cached_forward(served):
    """`mm(ids, adapter_ids=rows, use_cache=True)`, then a step continuing its cache: one cached graph
    (peftc.runtime.forward_cache) with the ids as an input. Each row's logits equal its own model's over the
    whole sequence (the base row's the original's); the IA3 rows' cache (it scales k_proj) equals its own
    compiled model's cached forward (one capture more; the others' caches feed the step's logits)."""
    cms, mm = served
    ids, mask = _prompt(len(ROWS), 5)
    prompt = mm(ids, attention_mask=mask, adapter_ids=ROWS, use_cache=True)
    token = prompt.logits[:, -1].argmax(-1, keepdim=True)
    longer = torch.cat([mask, torch.ones_like(token)], 1)
    step = mm(token, attention_mask=longer, adapter_ids=ROWS, past_key_values=prompt.past_key_values, use_cache=True)
    assert len(mm._cached_forward.graphs) == 1 and step.past_key_values is prompt.past_key_values
    whole = torch.cat([ids, token], 1)
    owners = {**cms, None: FAMILY.build().eval()}
    for name, own in owners.items():
        rows = [i for i, r in enumerate(ROWS) if r == name]
        torch.testing.assert_close(prompt.logits[rows], own(ids[rows], attention_mask=mask[rows]).logits, **TOL)
        want = own(whole[rows], attention_mask=longer[rows]).logits[:, -1:]
        torch.testing.assert_close(step.logits[rows], want, **TOL)
    rows = [i for i, r in enumerate(ROWS) if r == "ia3"]
    own = cms["ia3"](whole[rows], attention_mask=longer[rows], use_cache=True)
    for served_layer, own_layer in zip(step.past_key_values.layers, own.past_key_values.layers, strict=True):
        torch.testing.assert_close(served_layer.keys[rows], own_layer.keys, **TOL)
        torch.testing.assert_close(served_layer.values[rows], own_layer.values, **TOL)


def test_generate_checks_the_ids(served):
    _, mm = served
    ids, _ = _prompt(2, 3)
    with pytest.raises(peftc.SpecError, match=r"adapter_ids\[1\]"):
        mm.generate(ids, adapter_ids=["lora", "nope"], max_new_tokens=2)
    with pytest.raises(peftc.SpecError, match="missing"):
        mm.generate(ids, max_new_tokens=2)

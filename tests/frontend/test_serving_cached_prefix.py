"""Forward calls with a KV cache on prefix-tuned models (issue 13 item 3): a compiled prefix model's, and a served
model's with prefix rows beside LoRA and base rows. Checked against PEFT folders, step by step: PEFT's forward
refills its prefix cache on every call, so each step's reference is PEFT's forward over the whole sequence."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from generation_steps import greedy_cached_calls
from peft import LoraConfig, PeftModel, PrefixTuningConfig, TaskType
from peft_reference import save_random_peft_folders

import peftc

TOL = {"atol": 1e-5, "rtol": 1e-5}
FAMILY = FAMILIES["llama"]
STEPS = 3
ROWS = ["prefix3", None, "prefix2", "lora", "prefix3"]
PREFIX = {"prefix3": 3, "prefix2": 2}  # the prefix lengths, as the configs set them


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cached-prefix")
    configs = {name: PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n)
               for name, n in PREFIX.items()}
    configs["lora"] = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    save_random_peft_folders(FAMILY.build, configs, folder, seed=5)
    references = {name: PeftModel.from_pretrained(FAMILY.build(), folder / name).eval() for name in configs}
    return {name: folder / name for name in configs}, {**references, None: FAMILY.build().eval()}


def _prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = FAMILY.inputs(batch, 5)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1::3, :2] = 0  # left padding: the base row and the second prefix3 row
    return ids, mask


def _assert_cache_is_the_tokens_of(cache, reference_cache, skip: int) -> None:
    """Each layer's keys and values equal the reference's past its `skip` prefix entries (PEFT's cache starts
    with the prefix; a compiled model adds it at each attention op instead)."""
    for layer, want in zip(cache.layers, reference_cache.layers, strict=True):
        torch.testing.assert_close(layer.keys, want.keys[:, :, skip:], **TOL)
        torch.testing.assert_close(layer.values, want.values[:, :, skip:], **TOL)


@torch.no_grad()
def test_compiled_prefix_model_decodes_with_its_cache_as_peft(folders):
    """The prompt and each continued step equal PEFT's forward over the whole sequence, left padding included
    (the tokens' positions count from the prefix length in the cached graph too)."""
    sources, references = folders
    cm = peftc.from_peft(FAMILY.build(), sources["prefix3"]).eval()
    ids, mask = _prompt(2)
    for out, seq, seq_mask in greedy_cached_calls(cm, ids, mask, STEPS):
        want = references["prefix3"](input_ids=seq, attention_mask=seq_mask, use_cache=True)
        torch.testing.assert_close(out.logits, want.logits[:, -out.logits.shape[1]:], **TOL)
    _assert_cache_is_the_tokens_of(out.past_key_values, want.past_key_values, skip=PREFIX["prefix3"])


@torch.no_grad()
def test_served_prefix_lora_and_base_rows_decode_with_one_cache(folders):
    """One cache for the batch, whatever each row's prefix length (no row's prefix enters it): each row's logits
    and cache equal its own PEFT model's, the prompt and every step, from one cached graph."""
    sources, references = folders
    mm = peftc.serve_adapters(FAMILY.build(), sources, example_kwargs=FAMILY.inputs(2, 3)).eval()
    ids, mask = _prompt(len(ROWS))
    calls = greedy_cached_calls(mm, ids, mask, STEPS, adapter_ids=ROWS)
    assert len(mm._cached_forward.graphs) == 1
    assert calls[-1][0].past_key_values.get_seq_length() == calls[-1][1].shape[1]  # the tokens only, every row
    for out, seq, seq_mask in calls:
        for name, reference in references.items():
            rows = [i for i, row in enumerate(ROWS) if row == name]
            want = reference(input_ids=seq[rows], attention_mask=seq_mask[rows], use_cache=True)
            torch.testing.assert_close(out.logits[rows], want.logits[:, -out.logits.shape[1]:], **TOL)
            if out is calls[-1][0]:
                cache = out.past_key_values
                mine = type(cache)([(layer.keys[rows], layer.values[rows]) for layer in cache.layers])
                _assert_cache_is_the_tokens_of(mine, want.past_key_values, skip=PREFIX.get(name, 0))
    with pytest.raises(NotImplementedError, match="position_ids: served prefix adapters place"):
        mm(ids, adapter_ids=ROWS, position_ids=torch.arange(5).expand(len(ROWS), -1), use_cache=True)

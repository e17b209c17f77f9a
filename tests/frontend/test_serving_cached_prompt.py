"""Forward calls with a KV cache on prompt-tuned models (issue 13 item 3): a compiled prompt model's, and a served
model's with prompt rows of different lengths beside prefix, LoRA and base rows (peftc.runtime.prompt_cache).

The reference is each row's own PEFT model over the whole sequence, without a cache: PEFT's forward prepends
the virtual tokens on every call, a cache passed or not, so its own continued calls put them in twice; the
first call and the cache it starts are PEFT's forward's (N + S positions), as PEFT's generate() prepares them.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from generation_steps import greedy_cached_calls
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType
from peft_reference import save_random_peft_folders
from transformers import DynamicCache

import peftc

TOL = {"atol": 1e-5, "rtol": 1e-5}
FAMILY = FAMILIES["llama"]
STEPS = 2
PROMPT = {"prompt4": 4, "prompt2": 2}  # the virtual-token counts, as the configs set them
WIDTH = max(PROMPT.values())
ROWS = ["prompt4", None, "prompt2", "lora", "prefix", "prompt4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cached-prompt")
    configs = {name: PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=n) for name, n in PROMPT.items()}
    configs["lora"] = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    configs["prefix"] = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3)
    save_random_peft_folders(FAMILY.build, configs, folder, seed=7)
    references = {name: PeftModel.from_pretrained(FAMILY.build(), folder / name).eval() for name in configs}
    return {name: folder / name for name in configs}, {**references, None: FAMILY.build().eval()}


@pytest.fixture(scope="module")
def served(folders):
    sources, _ = folders
    return peftc.serve_adapters(FAMILY.build(), sources, example_kwargs=FAMILY.inputs(2, 3)).eval()


def _prompt(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = FAMILY.inputs(batch, 5)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1::2, :2] = 0  # left padding on the base, LoRA and last prompt4 rows
    return ids, mask


@torch.no_grad()
def test_compiled_prompt_model_puts_its_virtual_tokens_in_the_cache_once(folders):
    """The first call's N + S logits and cache equal PEFT's forward; each continued step's logits equal PEFT's over
    the whole sequence (no virtual tokens added again), left padding included, one captured graph for all calls."""
    sources, references = folders
    cm = peftc.from_peft(FAMILY.build(), sources["prompt4"]).eval()
    reference = references["prompt4"]
    ids, mask = _prompt(2)
    calls = greedy_cached_calls(cm, ids, mask, STEPS)
    first = reference(input_ids=ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(calls[0][0].logits, first.logits, **TOL)  # N + S positions, as PEFT's
    for out, seq, seq_mask in calls[1:]:
        want = reference(input_ids=seq, attention_mask=seq_mask, use_cache=True)
        assert out.logits.shape[1] == 1
        torch.testing.assert_close(out.logits, want.logits[:, -1:], **TOL)
    assert len(cm._cached_forward.graphs) == 1
    assert out.past_key_values.get_seq_length() == PROMPT["prompt4"] + seq.shape[1]
    for layer, theirs in zip(out.past_key_values.layers, want.past_key_values.layers, strict=True):
        torch.testing.assert_close(layer.keys, theirs.keys, **TOL)
        torch.testing.assert_close(layer.values, theirs.values, **TOL)


@torch.no_grad()
def test_served_rows_of_every_kind_share_one_cache_and_each_equals_its_own_peft_model(served, folders):
    """Prompt rows of 4 and 2 virtual tokens, a prefix, a LoRA and a base row, one cache of WIDTH + S entries:
    each row's logits (its last N + S of the first call's, then every step's) and cache entries equal its own
    PEFT model's over the whole sequence, from one cached graph."""
    _, references = folders
    ids, mask = _prompt(len(ROWS))
    calls = greedy_cached_calls(served, ids, mask, STEPS, adapter_ids=ROWS)
    assert len(served._cached_forward.graphs) == 1
    out, seq, seq_mask = calls[-1]
    assert out.past_key_values.get_seq_length() == WIDTH + seq.shape[1]  # the same for every row
    for name, reference in references.items():
        rows = [i for i, row in enumerate(ROWS) if row == name]
        own = PROMPT.get(name, 0)
        first = reference(input_ids=ids[rows], attention_mask=mask[rows]).logits
        torch.testing.assert_close(calls[0][0].logits[rows, WIDTH - own:], first, **TOL)
        for step, step_seq, step_mask in calls[1:]:
            want = reference(input_ids=step_seq[rows], attention_mask=step_mask[rows], use_cache=True)
            torch.testing.assert_close(step.logits[rows], want.logits[:, -1:], **TOL)
        for layer, theirs in zip(out.past_key_values.layers, want.past_key_values.layers, strict=True):
            skip = 3 if name == "prefix" else 0  # PEFT's cache starts with the prefix; the served one adds it per call
            torch.testing.assert_close(layer.keys[rows, :, WIDTH - own:], theirs.keys[:, :, skip:], **TOL)
            torch.testing.assert_close(layer.values[rows, :, WIDTH - own:], theirs.values[:, :, skip:], **TOL)
    base_step = references[None](input_ids=seq[:1], attention_mask=seq_mask[:1]).logits[:, -1:]
    assert (out.logits[:1] - base_step).abs().max() > 1e-2  # the prompt acts on the continued steps


@torch.no_grad()
def test_a_continued_call_takes_the_mask_over_the_callers_tokens_or_over_the_whole_cache(served):
    """PEFT's form (the caller's tokens) and the form extended by the virtual tokens give the same step; a mask of
    neither length, or a first call's mask covering the slots, fails naming the lengths it takes."""
    ids, mask = _prompt(len(ROWS))
    token = ids[:, :1]
    longer = torch.cat([mask, torch.ones_like(token)], 1)
    steps = []
    for step_mask in (longer, torch.cat([torch.ones(len(ROWS), WIDTH, dtype=mask.dtype), longer], 1)):
        cache = DynamicCache(config=FAMILY.build().config)  # made by the caller, filled by the first call
        served(ids, attention_mask=mask, adapter_ids=ROWS, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == WIDTH + ids.shape[1]
        steps.append(served(token, attention_mask=step_mask, adapter_ids=ROWS, past_key_values=cache,
                            use_cache=True).logits)
    torch.testing.assert_close(steps[0], steps[1], atol=0, rtol=0)
    wrong = r"attention_mask: \[6, 6\].*\[6, 7\] \(as HF PEFT takes it\).*\[6, 11\]"
    with pytest.raises(ValueError, match=wrong):  # the cache holds the second step now: the mask is one short
        served(token, attention_mask=longer, adapter_ids=ROWS, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"starts a cache takes a mask over its own tokens, \[6, 5\]"):
        served(ids, attention_mask=torch.cat([torch.ones(len(ROWS), WIDTH, dtype=mask.dtype), mask], 1),
               adapter_ids=ROWS, use_cache=True)
    with pytest.raises(NotImplementedError, match="position_ids: prompt-tuning"):
        served(ids, adapter_ids=ROWS, position_ids=torch.arange(5).expand(len(ROWS), -1), use_cache=True)

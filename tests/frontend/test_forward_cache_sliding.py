"""Sliding-window models derive their cached forward too: a mask per layer kind, no export, PEFT's numbers.

peftc.capture.cached_call gives each attention the mask of its layer (config.layer_types, or Mistral's
sliding_window for every layer): full causal, or create_sliding_window_causal_mask's. Mistral (every layer
sliding), Gemma 3 and Qwen2 (one sliding layer, one full) with a window of 4: a left-padded prompt of 8
tokens, then greedy steps, each compared with HF PEFT (same non-zero adapter weights) and its own cache.
"""

from __future__ import annotations

import pytest
import torch
from export_counter import counted_exports
from families import FAMILIES, MORE_FAMILIES, randomize_adapters
from peft import PeftModel

import peftc
from peftc.capture.cached_call import CACHE_DERIVED, SLIDING_MASK_INPUT

WINDOW, STEPS = 4, 4  # a prompt of 8 tokens is twice the window; the steps go further past it


def qwen2_sliding():
    """tests/families.py's Qwen2 with its second layer sliding (layer_types: full, sliding)."""
    from transformers import Qwen2ForCausalLM

    config = FAMILIES["qwen2"].build().config
    config.use_sliding_window, config.sliding_window = True, WINDOW
    config.max_window_layers = 1
    config.layer_types = ["full_attention", "sliding_attention"]
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


BUILDS = {"mistral": MORE_FAMILIES["mistral"].build, "gemma3": MORE_FAMILIES["gemma3"].build, "qwen2": qwen2_sliding}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def pair(request, tmp_path_factory):
    build = BUILDS[request.param]
    assert build().config.sliding_window == WINDOW
    cm = peftc.compile(build(), {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4,
                                               "alpha": 8}]})
    randomize_adapters(cm)
    folder = tmp_path_factory.mktemp(request.param)
    cm.save_adapter(folder, format="peft")
    return cm.eval(), PeftModel.from_pretrained(build(), folder).eval()


def padded_prompt():
    ids = torch.randint(3, 128, (2, 2 * WINDOW), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@torch.no_grad()
def test_a_plain_call_returns_the_cache_and_the_steps_past_the_window_equal_peft_without_export(pair):
    cm, reference = pair
    ids, mask = padded_prompt()
    with counted_exports() as exports:
        ours = cm(ids, attention_mask=mask)  # config.use_cache: the cache returned, as the original returns it
        theirs = reference(input_ids=ids, attention_mask=mask)
        real = mask.bool()
        torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-5, rtol=0)
        assert ours.past_key_values is not None
        for _ in range(STEPS):
            token = theirs.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            ours = cm(token, attention_mask=mask, past_key_values=ours.past_key_values)
            theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values,
                               use_cache=True)
            torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert exports == []
    graphs = list(cm._cached_forward.graphs.values())
    assert graphs and all(gm.meta.get(CACHE_DERIVED) for gm in graphs)
    assert any(node.name == SLIDING_MASK_INPUT for node in graphs[0].graph.find_nodes(op="placeholder"))


@torch.no_grad()
def test_generate_past_the_window_equals_peft(pair):
    cm, reference = pair
    ids, mask = padded_prompt()
    expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                                  eos_token_id=None)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=None), expected)

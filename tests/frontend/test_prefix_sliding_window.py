"""Prefix tuning on a sliding-window model (Mistral, window 4): PEFT's prefix sits at the cache's positions 0..N-1,
so the window hides it from late queries; the compiled prefix does the same (passes/insert_prefix.py), the served
one refuses (passes/lower_prefix_multi.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import peftc
from export_counter import counted_exports
from families import MORE_FAMILIES, randomize_adapters
from test_dropin_more_families import TOL, padded_prompts


def test_prefix_tuning_on_a_sliding_window_hides_the_prefix_from_late_queries_as_peft(tmp_path):
    """PEFT's prefix sits in the cache before the tokens, so Mistral's window (4) hides it from late queries. PEFT's
    own cached steps are broken for prefix tuning (test_virtual_generate.py's docstring): a continued step and
    generate() are compared with PEFT's forward over the whole sequence."""
    from peft import PeftModel

    model = MORE_FAMILIES["mistral"].build()
    cm = peftc.compile(model, {"adapters": [{"method": "prefix", "num_tokens": 2}]}).eval()
    randomize_adapters(cm, std=1.0)
    cm.save_adapter(tmp_path, format="peft")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    ids, mask = padded_prompts(model)
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits, **TOL)
        step, longer = torch.tensor([[5], [9]]), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        past = cm(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
        continued = cm(input_ids=step, attention_mask=longer, past_key_values=past, use_cache=True).logits[:, -1]
        whole = reference(input_ids=torch.cat([ids, step], 1), attention_mask=longer).logits[:, -1]
        torch.testing.assert_close(continued, whole, **TOL)
        expected, expected_mask = ids, mask
        for _ in range(6):  # greedy over PEFT's forward, with the positions transformers' generate passes
            positions = (expected_mask.cumsum(-1) - 1).masked_fill(expected_mask == 0, 1)
            token = reference(input_ids=expected, attention_mask=expected_mask,
                              position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)
            expected, expected_mask = torch.cat([expected, token], 1), torch.cat([expected_mask, torch.ones_like(token)], 1)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None), expected)


def test_serving_a_prefix_adapter_on_a_sliding_window_model_says_why_not(tmp_path):
    model = MORE_FAMILIES["mistral"].build()
    peftc.compile(model, {"adapters": [{"method": "prefix", "num_tokens": 2}]}).save_adapter(tmp_path, format="peft")
    with counted_exports() as exports, \
            pytest.raises(peftc.SpecError, match="'prefix'.*sliding-window layers.*peftc.from_peft"):
        peftc.serve_adapters(model, {"prefix": tmp_path})
    assert exports == []  # refused before the folder's compile


def test_prefix_tuning_past_an_attention_chunk_is_refused_naming_it_and_within_it_runs():
    """A model whose config sets attention_chunk_size (Llama 4's chunked attention, here on tests' LLaMA config)
    refuses a forward or generate() whose tokens and the prefix exceed one chunk (peftc.runtime.prefix_window);
    calls within the chunk run. The refusal comes before any graph runs."""
    from families import FAMILIES

    model = FAMILIES["llama"].build()
    model.config.attention_chunk_size = 8
    cm = peftc.compile(model, {"adapters": [{"method": "prefix", "num_tokens": 2}]}).eval()
    randomize_adapters(cm, std=1.0)
    short, long = torch.randint(1, 128, (1, 6)), torch.randint(1, 128, (1, 7))
    with torch.no_grad():
        assert cm(input_ids=short).logits.shape == (1, 6, 128)  # 6 + 2 prefix = one chunk
        with pytest.raises(NotImplementedError, match="chunks of 8.*7 tokens.*2 prefix tokens"):
            cm(input_ids=long)
    assert cm.generate(short[:, :4], max_new_tokens=2, eos_token_id=None).shape == (1, 6)
    with pytest.raises(NotImplementedError, match=r"generate\(\) has 7 tokens"):
        cm.generate(short[:, :4], max_new_tokens=3, eos_token_id=None)

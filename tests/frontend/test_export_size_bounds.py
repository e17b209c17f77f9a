"""Size bounds export infers from its 0/1 assumption are not checked (peftc.capture.size_bounds).

A guard relating sizes (`past + new <= mask`) is checked as written; the lower bound export derives
from it by counting every size at 2 (`mask >= 4`) is not: GPT-2 with eager attention, its cached
graph captured (a cached forward without the superset graph: eager attention derives it otherwise,
peftc.capture.attention_sites), takes a one-token prompt as the original does.
"""

from __future__ import annotations

import functools

import pytest
import torch
from families import FAMILIES, randomize_adapters
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim

import peftc
from peftc.capture.export import capture
from peftc.runtime.forward_cache import CachedForward


class PaddedSum(nn.Module):
    """Needs mask.size(1) >= past.size(1) + x.size(1): transformers' padding-mask rule, in small."""

    def forward(self, x, past, mask):
        torch._check(mask.shape[1] >= past.shape[1] + x.shape[1])
        return x.sum(1) + past.sum(1) + mask.sum(1)


def example(x_len: int, past_len: int, mask_len: int) -> dict:
    """Integer tensors: capture makes their batch and sequence dims dynamic (peftc.capture.export)."""
    ones = lambda length: torch.ones(2, length, dtype=torch.long)
    return {"x": ones(x_len), "past": ones(past_len), "mask": ones(mask_len)}


def test_a_relation_between_sizes_is_checked_and_no_bound_derived_from_it():
    gm = capture(PaddedSum(), (), example(3, 5, 10), copy_layers=False)
    for sizes in [(1, 1, 2), (1, 0, 1), (2, 2, 4), (4, 7, 30)]:  # relation holds, mask below the derived 7 (2 + 5)
        assert torch.equal(gm(**example(*sizes)), PaddedSum()(**example(*sizes)))
    with pytest.raises(AssertionError, match="Guard failed"):
        gm(**example(3, 5, 7))  # mask shorter than past + new: still refused


@functools.cache
def captured_padded_sum():
    return capture(PaddedSum(), (), example(3, 5, 10), copy_layers=False)


@given(x_len=st.integers(1, 12), past_len=st.integers(0, 12), mask_len=st.integers(1, 30))
def test_the_graph_takes_exactly_the_calls_whose_sizes_keep_the_relation(x_len, past_len, mask_len):
    """Whatever the sizes, the graph refuses a call iff past + new > mask (the model's own rule), and
    otherwise returns the module's result: no bound export inferred from counting sizes at 2."""
    call = example(x_len, past_len, mask_len)
    if mask_len >= past_len + x_len:
        assert torch.equal(captured_padded_sum()(**call), PaddedSum()(**call))
    else:
        with pytest.raises(AssertionError, match="Guard failed"):
            captured_padded_sum()(**call)


def test_a_declared_minimum_is_kept():
    shapes = {"x": {1: Dim("x_len", min=3)}, "past": {1: Dim.AUTO}, "mask": {1: Dim.AUTO}}
    gm = capture(PaddedSum(), (), example(3, 5, 8), dynamic_shapes=shapes, copy_layers=False)
    assert torch.equal(gm(**example(3, 5, 8)), PaddedSum()(**example(3, 5, 8)))
    with pytest.raises(AssertionError, match="Guard failed"):
        gm(**example(2, 5, 8))


def captured_eager_gpt2():
    """GPT-2 with eager attention, compiled, its cached graphs captured (not derived from the superset)."""
    model = FAMILIES["gpt2"].build()
    model.config._attn_implementation = "eager"
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["c_attn"], "r": 4}]})
    cm._cached_forward = CachedForward(cm.compilation, cm.plan)  # no superset graph: every signature captures
    return cm


def test_eager_attention_gpt2_takes_a_one_token_prompt_with_a_cache():
    cm = captured_eager_gpt2()
    randomize_adapters(cm)
    merged = cm.merge_and_unload()  # the original's class and code, adapters folded in
    for batch, length in [(2, 6), (1, 1), (3, 2)]:
        ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(length))
        out, ref = cm(input_ids=ids, use_cache=True), merged(input_ids=ids, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        step = ids[:, -1:]
        out = cm(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        ref = merged(input_ids=step, past_key_values=ref.past_key_values, use_cache=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_a_cached_call_a_graph_guard_refuses_names_the_argument_and_keeps_the_cache():
    cm = captured_eager_gpt2()
    ids = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(0))
    cache = cm(input_ids=ids, use_cache=True).past_key_values
    keys = cache.layers[0].keys.clone()
    short_mask = torch.ones(1, 3, dtype=torch.long)  # 4 past + 1 new tokens need 5 columns
    with pytest.raises(peftc.CallError, match="attention_mask"):
        cm(input_ids=ids[:, :1], attention_mask=short_mask, past_key_values=cache, use_cache=True)
    assert torch.equal(cache.layers[0].keys, keys)  # neither the graph nor the original's run extended it

"""Builds after compile reuse its capture (peftc.capture.captured): merged(), merge_and_unload() and a
deep copy run no torch.export, and give what a fresh capture gives; a changed dtype captures again."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from export_counter import counted_exports
from families import FAMILIES, logits, randomize_adapters

import peftc
from peftc.capture.captured import CapturedGraphs, same_call
from peftc.ir.modes import set_mode

LORA = {"method": "lora", "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def gpt2():
    """GPT-2 (dropout, tied embeddings) compiled with non-zero LoRA, in eval mode; only read by the tests."""
    family = FAMILIES["gpt2"]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{**LORA, "targets": list(family.targets)}]}).eval()
    randomize_adapters(cm)
    return family, model, cm


def fresh_capture_merged(cm):
    """merged() as it was built before captures were kept: the example call captured again."""
    compilation = replace(cm.compilation, captured=CapturedGraphs())
    return compilation.build(*cm.example_call, compilation.merged_plan()).graph_module


def test_merged_and_unload_run_no_export_and_match_a_fresh_capture(gpt2):
    _, model, cm = gpt2
    args, kwargs = cm.example_call
    with counted_exports() as calls:
        merged = cm.merged().eval()
        plain = cm.merge_and_unload()
    assert calls == []
    with torch.no_grad():
        fresh = fresh_capture_merged(cm)
        set_mode(fresh, False)
        expected = logits(fresh(*args, **kwargs))
        assert torch.equal(logits(merged(*args, **kwargs)), expected)
        assert torch.equal(logits(plain(*args, **kwargs)), expected)
        torch.testing.assert_close(expected, logits(cm(*args, **kwargs)), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits(model(*args, **kwargs)), expected, atol=1e-4)  # the adapters did something


def test_captures_leave_every_submodule_in_its_mode(gpt2):
    """The superset capture goes through a keyword view whose train(was_training) put every submodule of
    the model in train mode: a model unloaded without a capture after it would run dropout."""
    _, _, cm = gpt2
    assert {m.training for m in cm.compilation.source.modules()} == {False}
    assert {m.training for m in cm.merge_and_unload().modules()} == {False}


def test_deepcopy_runs_no_export_and_owns_its_weights(gpt2):
    family, _, cm = gpt2
    x = family.inputs(2, 5)
    with counted_exports() as calls:
        twin = copy.deepcopy(cm)
    assert calls == []
    with torch.no_grad():
        assert torch.equal(logits(twin(**x)), logits(cm(**x)))
        ours = {p.data_ptr() for p in cm.parameters()}
        assert not any(p.data_ptr() in ours for p in twin.parameters())
        next(iter(twin.adapter_root.parameters())).add_(1.0)  # the twin's weights are read, not the original's
        assert not torch.equal(logits(twin(**x)), logits(cm(**x)))


def test_a_changed_dtype_captures_again(gpt2):
    """A kept capture bakes in dtypes: after .to(float64) the model's weights no longer fit it."""
    family, _, cm = gpt2
    twin = copy.deepcopy(cm)
    x = family.inputs(2, 5)
    with torch.no_grad():
        expected = logits(twin(**x)).double()
        with counted_exports() as calls:
            twin.to(torch.float64)
        assert len(calls) == 1
        torch.testing.assert_close(logits(twin(**x)), expected, atol=1e-5, rtol=1e-5)


def test_same_call_compares_values_and_structure():
    ids = torch.tensor([[1, 2, 3]])
    assert same_call(((), {"input_ids": ids, "use_cache": False}), ((), {"input_ids": ids.clone(), "use_cache": False}))
    assert not same_call(((), {"input_ids": ids}), ((), {"input_ids": ids + 1}))
    assert not same_call(((), {"input_ids": ids}), ((), {"input_ids": ids.float()}))
    assert not same_call(((), {"input_ids": ids, "use_cache": False}), ((), {"input_ids": ids, "use_cache": True}))
    assert not same_call(((), {"input_ids": ids}), ((ids,), {}))

"""The first cached forward derives its graph from the superset capture: no torch.export, the same numbers.

peftc.runtime.cache_derivation: a compiled model's `cm(ids, use_cache=True)` runs a graph made from the
compile's own capture (cache points marked there, peftc.capture.cache_points); the graph is checked
once per model and a call it cannot serve captures as before. Compared with HF PEFT over the prompt and
three greedy steps, left-padded, and with the original's own cache.
"""

from __future__ import annotations

import pytest
import torch
from test_forward_cache import compiled_pair
from transformers import MistralConfig, Qwen2Config

from peftc.capture.cache_points import CACHE_POINT
from peftc.capture.cached_call import CACHE_DERIVED
from peftc.runtime import cache_derivation
from peftc.runtime.forward_cache import CachedForward

STEPS = 3


CASES = [("llama", "lora"), ("qwen2", "ia3"), ("gpt2", "lora")]  # test_forward_cache's models (LLaMA: 3 layers)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def pair(request, tmp_path_factory):
    return compiled_pair(request.param, tmp_path_factory.mktemp("-".join(request.param)))


@pytest.fixture
def fresh_pair(pair, monkeypatch):
    """The compiled model as if it had run no cached call yet (its cached forward made again on the next one)."""
    cm, reference = pair
    monkeypatch.setattr(cm, "_cached_forward", None)
    return cm, reference


def count_exports(monkeypatch) -> list:
    calls = []
    export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(a) or export(*a, **k))
    return calls


def left_padded_prompt():
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return ids, mask


def assert_same_cache(ours, theirs):
    assert len(ours.layers) == len(theirs.layers)
    for mine, reference in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(mine.keys, reference.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.values, reference.values, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_first_cached_call_exports_nothing_and_equals_peft(fresh_pair, monkeypatch):
    """LLaMA, Qwen2 and GPT-2 (its fused c_attn and learned positions): derived, no capture."""
    cm, reference = fresh_pair
    exports = count_exports(monkeypatch)
    ids, mask = left_padded_prompt()
    ours = cm(ids, attention_mask=mask, use_cache=True)
    theirs = reference(input_ids=ids, attention_mask=mask, use_cache=True)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-5, rtol=0)
    for _ in range(STEPS):  # greedy, each call continuing the cache the last one returned
        token = theirs.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        ours = cm(token, attention_mask=mask, past_key_values=ours.past_key_values, use_cache=True)
        theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values,
                           use_cache=True)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    assert exports == []
    graphs = list(cm._cached_forward.graphs.values())
    assert len(graphs) == 1 and graphs[0].meta[CACHE_DERIVED]


@torch.no_grad()
def test_the_superset_graph_holds_tags_where_the_cache_is_written_and_no_marker_op(pair):
    """Tags on each layer's values and keys (a copied layer's too), and no marker op left to run."""
    cm, _ = pair
    nodes = list(cm._superset_flat.graph.nodes)
    roles = [node.meta[CACHE_POINT] for node in nodes if CACHE_POINT in node.meta]
    pairs = [set(roles[i:i + 2]) for i in range(0, len(roles), 2)]  # one pair per layer, in layer order
    assert pairs == [{"keys", "values"}] * cm.config.num_hidden_layers
    assert not any(node.target is torch.ops.peftc.cache_point.default for node in nodes)


@torch.no_grad()
def test_a_call_outside_the_superset_is_not_derived(fresh_pair):
    """logits_to_keep is not in the superset call: no cached graph is derived for it (the caller captures)."""
    cm, _ = fresh_pair
    ids, mask = left_padded_prompt()
    cm(ids, attention_mask=mask, use_cache=True)
    derivation = cm._cached_forward.derivation
    assert derivation.derive({"input_ids": ids, "attention_mask": mask}) is not None
    assert derivation.derive({"input_ids": ids, "attention_mask": mask, "logits_to_keep": 1}) is None


@torch.no_grad()
def test_a_model_the_check_refuses_captures_its_cached_graph_and_still_equals_peft(tmp_path_factory, monkeypatch):
    """A model whose positions would not continue from the past (stood in for by the check's own positions
    restarting at 0): the check's logits differ from the whole sequence's, nothing derived runs, and the
    cached graph is captured as before derivation (one export); prompt and a continued step equal PEFT's."""
    cm, reference = compiled_pair(CASES[0], tmp_path_factory.mktemp("llama-lora"))
    positions_from_zero = cache_derivation.derived_inputs
    monkeypatch.setattr(cache_derivation, "derived_inputs",
                        lambda model, inputs, cache, past: positions_from_zero(model, inputs, cache, 0))
    exports = count_exports(monkeypatch)
    forward = CachedForward(cm.compilation, cm.plan, (cm._superset, cm._superset_flat))  # a fresh check
    ids, mask = left_padded_prompt()
    ours = forward({"input_ids": ids, "attention_mask": mask, "use_cache": True}, training=False)
    theirs = reference(input_ids=ids, attention_mask=mask, use_cache=True)
    token = theirs.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([mask, torch.ones_like(token)], 1)
    ours = forward({"input_ids": token, "attention_mask": mask, "past_key_values": ours.past_key_values}, False)
    theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values, use_cache=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    assert len(exports) == 1 and forward.derivation.holds() is False
    assert not any(gm.meta.get(CACHE_DERIVED) for gm in forward.graphs.values())


def test_each_layer_gets_the_mask_of_its_attention_kind_and_chunked_or_softcapped_models_are_refused():
    from transformers import Gemma2Config, Llama4TextConfig

    from peftc.capture.cached_call import layer_kinds

    assert layer_kinds(Qwen2Config(num_hidden_layers=2)) == ["full_attention"] * 2
    assert layer_kinds(Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)) == ["full_attention", "sliding_attention"]
    assert layer_kinds(MistralConfig(num_hidden_layers=2, sliding_window=4)) == ["sliding_attention"] * 2
    assert layer_kinds(MistralConfig(num_hidden_layers=2, sliding_window=None)) == ["full_attention"] * 2
    assert layer_kinds(Gemma2Config(num_hidden_layers=2)) is None  # attn_logit_softcapping
    assert layer_kinds(Llama4TextConfig(num_hidden_layers=2)) is None  # chunked attention

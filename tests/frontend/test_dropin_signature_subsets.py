"""Every subset of the superset's optional inputs gets a derived graph (no capture) that returns what the
original model with the same non-zero adapters returns (peft), on random shapes and padding (hypothesis).
The inputs: labels, num_items_in_batch, the output flags, return_dict=False, use_cache (absent, True or False,
over config.use_cache True or False: the original's DynamicCache or none, peftc.runtime.forward_cache), and the inputs whose
default the derived graph computes (position_ids; token_type_ids for BERT: peftc.capture.input_defaults),
with input_ids or their embeddings passed as inputs_embeds.

The models have three layers, so the capture copies layer 1 for layer 2 (peftc.capture.layer_stacks)
and the per-layer hidden states and attentions are grown from the two-layer capture
(peftc.capture.recorded_outputs): the case a wrong derivation or a wrong growth would show in.
"""

from __future__ import annotations

import pytest
import torch
from families import randomize_adapters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft_reference import peft_lora
from transformers import DynamicCache

import peftc

OPTIONAL = ("labels", "num_items_in_batch", "output_hidden_states", "output_attentions", "return_dict",
            "position_ids", "token_type_ids")


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _eager_gpt2():
    """Eager attention: output_attentions returns real per-layer weights (sdpa returns none)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
                     eos_token_id=0, attn_implementation="eager")
    return GPT2LMHeadModel(cfg).eval()


def _bert():
    """Takes token_type_ids (default: zeros, computed in the derived graph) and class labels."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                     vocab_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


FAMILIES = {"llama": (_llama, ["q_proj", "v_proj"]), "gpt2-eager": (_eager_gpt2, ["c_attn"]),
            "bert": (_bert, ["query", "value"])}
DERIVED = {  # the optional inputs each family's superset holds (GPT-2's token types add an embedding: captured)
    "llama": set(OPTIONAL) - {"token_type_ids"}, "gpt2-eager": set(OPTIONAL) - {"token_type_ids"},
    "bert": set(OPTIONAL),
}

# The families whose cached graphs derive from the superset (SDPA or eager attention; peftc.capture.cached_call):
# their plain calls return the original's DynamicCache (BERT takes no cache).
CACHE_DERIVED = {"llama", "gpt2-eager"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    build, targets = FAMILIES[request.param]
    cm = peftc.compile(build(), {"adapters": [{"method": "lora", "targets": targets, "r": 4, "alpha": 8}]})
    randomize_adapters(cm)
    reference = peft_lora(build(), cm, targets, r=4, alpha=8)
    assert cm.flat_graph_module.meta.get("peftc_copied_layers")  # layer 2 is a copy: growth is tested
    return cm.eval(), reference.eval(), request.param


def _call(data, batch: int, seq: int, family: str) -> dict:
    """Kwargs for both models with some of the family's superset inputs, drawn."""
    g = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, 64, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : data.draw(st.integers(0, seq - 1), label="left padding")] = 0
    chosen = data.draw(st.sets(st.sampled_from(sorted(DERIVED[family]))), label="optional inputs")
    kwargs: dict = {"input_ids": ids, "attention_mask": mask}
    if "labels" in chosen or "num_items_in_batch" in chosen:  # Trainer passes the count with labels only
        labels = torch.randint(0, 3, (batch,), generator=g) if family == "bert" else ids.clone()
        if family != "bert":
            labels[mask == 0] = -100
        kwargs["labels"] = labels
        if "num_items_in_batch" in chosen:
            kwargs["num_items_in_batch"] = torch.tensor(int(data.draw(st.integers(1, 50), label="items")))
    if "position_ids" in chosen:  # any positions: a user's, a packed batch's
        start = data.draw(st.integers(0, 20), label="first position")
        kwargs["position_ids"] = (torch.arange(seq) + start).unsqueeze(0).expand(batch, -1).contiguous()
    if "token_type_ids" in chosen:
        kwargs["token_type_ids"] = torch.randint(0, 2, (batch, seq), generator=g)
    for flag in ("output_hidden_states", "output_attentions"):
        if flag in chosen:
            kwargs[flag] = True
    if "return_dict" in chosen:
        kwargs["return_dict"] = False
    return kwargs


def _flat(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, DynamicCache):  # every layer's keys and values
        return [t for layer in value.layers for t in (layer.keys, layer.values)]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _flat(item)]
    if hasattr(value, "to_tuple"):
        return _flat(value.to_tuple())
    return [value]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), batch=st.integers(2, 3), seq=st.integers(2, 7))
def test_any_subset_of_optional_inputs_is_derived_and_equals_the_original(pair, monkeypatch, data, batch, seq):
    cm, reference, family = pair
    kwargs = _call(data, batch, seq, family)
    if data.draw(st.booleans(), label="inputs_embeds in place of input_ids"):  # peftc.capture.embeds_input
        with torch.no_grad():
            kwargs["inputs_embeds"] = reference.get_input_embeddings()(kwargs.pop("input_ids"))
    if family in CACHE_DERIVED:  # use_cache: absent (the config's, drawn too), True or False; the original's cache or none
        use_cache = data.draw(st.sampled_from([None, True, False]), label="use_cache")
        kwargs.update({} if use_cache is None else {"use_cache": use_cache})
        default = data.draw(st.booleans(), label="config.use_cache")
        monkeypatch.setattr(cm.config, "use_cache", default)
        monkeypatch.setattr(reference.config, "use_cache", default)
    captures = []
    build = type(cm.compilation).build
    monkeypatch.setattr(type(cm.compilation), "build", lambda self, *a, **k: captures.append(a) or build(self, *a, **k))
    with torch.no_grad():
        ours, theirs = cm(**kwargs), reference(**kwargs)
    assert captures == []
    if kwargs.get("return_dict") is False:
        assert isinstance(ours, tuple) and isinstance(theirs, tuple)
    else:
        assert list(ours.keys()) == list(theirs.keys())
    ours, theirs = _flat(ours), _flat(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grown_outputs_equal_a_fresh_capture_of_that_call(pair):
    """The superset graph's per-layer outputs (grown from two traced layers) equal a capture of that
    very call with every layer traced (copy_layers off)."""
    cm, _, family = pair
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "output_hidden_states": True,
              "output_attentions": True, **({} if family == "bert" else {"use_cache": False})}
    gm, args, kwargs = cm.graph_for((), kwargs)
    fresh = peftc.compile(cm.compilation.source, cm.compilation.spec, example_kwargs=kwargs, copy_layers=False)
    ours_state, fresh_state = cm.adapter_state_dict(), fresh.adapter_state_dict()
    assert ours_state.keys() == fresh_state.keys()
    with torch.no_grad():
        for name, tensor in fresh_state.items():
            tensor.copy_(ours_state[name])
    with torch.no_grad():
        ours, theirs = _flat(gm(*args, **kwargs)), _flat(fresh.eval()(**kwargs))
    assert len(ours) == len(theirs) > 3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_output_flags_equal_to_the_config_are_the_call_without_them(pair):
    cm, _, _ = pair
    ids = torch.randint(0, 64, (2, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = cm(input_ids=ids).logits
        spelled = cm(input_ids=ids, output_hidden_states=False, output_attentions=False, use_cache=False)
    assert set(spelled.keys()) == {"logits"}
    torch.testing.assert_close(spelled.logits, plain, atol=0, rtol=0)


def test_misspelled_keyword_raises_what_the_original_raises(pair):
    """transformers 5 models take any keyword through **kwargs: a misspelled input_ids gets their error."""
    cm, reference, _ = pair
    ids = torch.randint(0, 64, (2, 4))
    with pytest.raises(Exception) as theirs:
        reference.base_model.model(inputs_ids=ids)
    with pytest.raises(type(theirs.value)) as ours:
        cm(inputs_ids=ids)
    assert str(ours.value) == str(theirs.value)

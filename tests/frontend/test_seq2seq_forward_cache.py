"""Forward calls with a KV cache on T5 and BART return and continue an EncoderDecoderCache, as PEFT's model does.

LoRA (non-zero) on q and v of every attention, the decoder's cross-attention included, so the cross keys and
values the first call caches carry an adapter. The reference is PEFT's get_peft_model on the same base with
the same adapter weights (tests/peft_reference.py); every call is made on both, each with its own cache.
"""

from __future__ import annotations

import pytest
import torch
from export_counter import counted_exports
from families import MORE_FAMILIES, randomize_adapters
from peft_reference import peft_lora

import peftc

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module", params=["t5", "bart"])
def pair(request):
    """(family, compiled model in eval, PEFT's model with the same LoRA weights)."""
    family = MORE_FAMILIES[request.param]
    model = without_dropout(family.build())
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": list(family.targets), "r": 4,
                                             "alpha": 8}]}).eval()
    randomize_adapters(cm, std=0.3)
    return family, cm, peft_lora(model, cm, family.targets, 4, 8).eval()


def without_dropout(model):
    """`model` with every dropout off (T5's modules, BART's rates), so a training call is deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for rate in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(module, rate, None), float):
                setattr(module, rate, 0.0)
    return model


def call(family, batch: int = 2, encoder_len: int = 7):
    """Encoder ids and a padding mask (the last row 2 tokens shorter), and decoder ids."""
    inputs = family.inputs(batch, encoder_len)
    mask = torch.ones_like(inputs["input_ids"])
    mask[-1, -2:] = 0
    return inputs["input_ids"], mask, inputs["decoder_input_ids"]


def assert_same_cache(ours, theirs):
    from transformers import DynamicCache, EncoderDecoderCache

    assert type(ours) is EncoderDecoderCache
    for mine, reference in ((ours.self_attention_cache, theirs.self_attention_cache),
                            (ours.cross_attention_cache, theirs.cross_attention_cache)):
        assert type(mine) is DynamicCache and len(mine.layers) == len(reference.layers)
        for a, b in zip(mine.layers, reference.layers):
            torch.testing.assert_close(a.keys, b.keys, **TOLERANCE)
            torch.testing.assert_close(a.values, b.values, **TOLERANCE)
    assert ours.is_updated == theirs.is_updated


def tokens(step: int, batch: int = 2) -> torch.Tensor:
    return torch.arange(batch)[:, None] + 5 + 7 * step


@torch.no_grad()
def test_use_cache_returns_the_cache_as_peft_and_a_plain_call_captures_nothing(pair):
    """use_cache=True: PEFT's fields, logits and both caches. A call saying nothing of a cache keeps the compile's
    graph (its cached graphs are captured, not derived: docs/design-call-signatures.md) and returns no cache."""
    family, cm, reference = pair
    ids, mask, decoder_ids = call(family)
    ours = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
    theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
    assert list(ours.keys()) == list(theirs.keys())  # logits, cache, encoder_last_hidden_state
    torch.testing.assert_close(ours.logits, theirs.logits, **TOLERANCE)
    torch.testing.assert_close(ours.encoder_last_hidden_state, theirs.encoder_last_hidden_state, **TOLERANCE)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    assert ours.past_key_values.self_attention_cache.get_seq_length() == decoder_ids.shape[1]
    assert ours.past_key_values.cross_attention_cache.get_seq_length() == ids.shape[1]
    with counted_exports() as exports:
        plain = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    assert exports == [] and plain.past_key_values is None
    torch.testing.assert_close(plain.logits, theirs.logits, **TOLERANCE)


@torch.no_grad()
@pytest.mark.parametrize("encoder", ["encoder_outputs", "input_ids"])
def test_one_token_steps_continue_the_cache_as_peft(pair, encoder):
    """use_cache=True, then three one-token steps passing the cache back (and the encoder output, or the ids
    again, which the original encodes again and whose cross keys it does not recompute)."""
    family, cm, reference = pair
    ids, mask, decoder_ids = call(family)
    ours = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
    theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
    cache = ours.past_key_values
    for step in range(3):
        given = ({"encoder_outputs": (ours.encoder_last_hidden_state,)} if encoder == "encoder_outputs"
                 else {"input_ids": ids})
        reference_given = ({"encoder_outputs": (theirs.encoder_last_hidden_state,)} if encoder == "encoder_outputs"
                           else {"input_ids": ids})
        ours = cm(**given, attention_mask=mask, decoder_input_ids=tokens(step), past_key_values=ours.past_key_values)
        theirs = reference(**reference_given, attention_mask=mask, decoder_input_ids=tokens(step),
                           past_key_values=theirs.past_key_values)
        assert ours.logits.shape == theirs.logits.shape == (2, 1, family.build().config.vocab_size)
        torch.testing.assert_close(ours.logits, theirs.logits, **TOLERANCE)
        assert_same_cache(ours.past_key_values, theirs.past_key_values)
        assert ours.past_key_values is cache  # updated in place, as the original updates the cache passed
        assert cache.self_attention_cache.get_seq_length() == decoder_ids.shape[1] + step + 1
        assert cache.cross_attention_cache.get_seq_length() == ids.shape[1]


@torch.no_grad()
def test_step_with_a_decoder_mask_and_a_new_shape_captures_nothing_more(pair):
    """A decoder padding mask over past and new tokens; after the first calls of each kind, another batch size
    and encoder length reuse the graphs (their shapes are dynamic)."""
    family, cm, reference = pair
    ids, mask, decoder_ids = call(family)
    cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=torch.ones_like(decoder_ids),
       use_cache=True)
    out = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
    cm(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=tokens(0),
       past_key_values=out.past_key_values, decoder_attention_mask=torch.ones(2, decoder_ids.shape[1] + 1, dtype=torch.long))
    ids, mask, decoder_ids = call(family, batch=3, encoder_len=9)
    decoder_mask = torch.ones_like(decoder_ids)
    decoder_mask[0, :2] = 0  # the first row's decoder prefix left-padded
    with counted_exports() as exports:
        ours = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask,
                  use_cache=True)
        step_mask = torch.cat([decoder_mask, torch.ones(3, 1, dtype=torch.long)], 1)
        ours = cm(encoder_outputs=(ours.encoder_last_hidden_state,), attention_mask=mask, decoder_input_ids=tokens(0, 3),
                  past_key_values=ours.past_key_values, decoder_attention_mask=step_mask)
    assert exports == []
    theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
    theirs = reference(encoder_outputs=(theirs.encoder_last_hidden_state,), attention_mask=mask,
                       decoder_input_ids=tokens(0, 3), past_key_values=theirs.past_key_values,
                       decoder_attention_mask=step_mask)
    torch.testing.assert_close(ours.logits, theirs.logits, **TOLERANCE)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)


@torch.no_grad()
def test_labels_and_return_dict_false_give_the_originals_tuple(pair):
    """With use_cache=True, BART keeps no cache when given labels and no cache; T5 keeps one: the tuples are
    PEFT's either way."""
    family, cm, reference = pair
    ids, mask, decoder_ids = call(family)
    labels = decoder_ids.roll(1, 1)
    ours = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels, return_dict=False,
              use_cache=True)
    theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels,
                       return_dict=False, use_cache=True)
    assert [type(x).__name__ for x in ours] == [type(x).__name__ for x in theirs]
    assert ("EncoderDecoderCache" in [type(x).__name__ for x in ours]) == (family.name == "t5")
    for mine, reference_value in zip(ours, theirs):
        if isinstance(mine, torch.Tensor):
            torch.testing.assert_close(mine, reference_value, **TOLERANCE)
        else:
            assert_same_cache(mine, reference_value)


@torch.no_grad()
def test_use_cache_false_returns_no_cache(pair):
    family, cm, reference = pair
    ids, mask, decoder_ids = call(family)
    ours = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False)
    theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False)
    assert ours.past_key_values is None and theirs.past_key_values is None
    torch.testing.assert_close(ours.logits, theirs.logits, **TOLERANCE)


@torch.no_grad()
def test_unsupported_calls_name_the_problem(pair):
    from transformers import DynamicCache

    family, cm, _ = pair
    ids, mask, decoder_ids = call(family)
    with pytest.raises(TypeError, match="EncoderDecoderCache"):
        cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, past_key_values=DynamicCache())
    embeds = cm.get_input_embeddings()(ids)
    with pytest.raises(NotImplementedError, match=r"inputs_embeds.*use_cache=False"):
        cm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
    out = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=True)
    with pytest.raises(ValueError, match=r"cross-attention layer 0 keys.*encoder length=5"):
        cm(input_ids=ids[:, :5], attention_mask=mask[:, :5], decoder_input_ids=tokens(0),
           past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match="batch=1"):
        cm(input_ids=ids[:1], attention_mask=mask[:1], decoder_input_ids=tokens(0, 1),
           past_key_values=out.past_key_values)


def test_training_call_with_use_cache_has_peft_gradients(pair):
    """use_cache=True in training (no checkpointing) returns the cache and the loss's adapter gradients, as PEFT."""
    from peft_reference import peft_lora_grads

    family, cm, reference = pair
    ids, mask, decoder_ids = call(family)
    labels = decoder_ids.roll(1, 1)
    cm.train(), reference.train()
    try:
        cm.zero_grad(), reference.zero_grad()
        ours = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels, use_cache=True)
        theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, labels=labels,
                           use_cache=True)
        ours.loss.backward()
        theirs.loss.backward()
    finally:
        cm.eval(), reference.eval()
    torch.testing.assert_close(ours.loss, theirs.loss, **TOLERANCE)
    assert (ours.past_key_values is None) == (theirs.past_key_values is None)
    mine = {name: p.grad for name, p in cm.adapter_root.named_parameters()}
    expected = peft_lora_grads(reference)
    assert mine.keys() == expected.keys() and len(mine) >= 4
    for name, grad in mine.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], **TOLERANCE)


@torch.no_grad()
def test_served_model_refuses_a_cached_call_and_serves_a_plain_one(pair):
    family, cm, reference = pair
    served = peftc.serve_adapters(cm.compilation.source, {"a": cm})
    ids, mask, decoder_ids = call(family)
    with pytest.raises(NotImplementedError, match=r"served encoder-decoder.*use_cache=False"):
        served(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, adapter_ids=["a", "a"],
               use_cache=True)
    ours = served(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, adapter_ids=["a", "a"])
    theirs = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    torch.testing.assert_close(ours.logits, theirs.logits, **TOLERANCE)

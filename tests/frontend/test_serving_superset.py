"""serve_adapters captures the superset call, as peftc.compile does: a served model's first call with labels or
output_hidden_states=True derives its graph (no export), a plain call of a served causal LM returns the cache its
derived cached graph makes, and every row still equals its own adapter's compiled model. Prompt and prefix rows
derive their plain signatures too; their cached graphs are captured (GraphDispatch._serves_virtual_tokens)."""

from __future__ import annotations

import pytest
import torch
from export_counter import counted_exports
from families import FAMILIES, compile_family_specs, randomize_adapters

import peftc

TOL = dict(atol=1e-5, rtol=1e-5)
FAMILY = FAMILIES["llama"]
BATCH, SEQ = 4, 5
LINEAR = {"sql": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8},
          "ia3": {"method": "ia3", "targets": ["k_proj", "down_proj"], "feedforward": ["down_proj"]}}
LINEAR_ROWS = ["sql", None, "ia3", "sql"]
VIRTUAL = {"prompt3": {"method": "prompt", "num_tokens": 3}, "prefix2": {"method": "prefix", "num_tokens": 2},
           "lora": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2, "alpha": 4}}
VIRTUAL_ROWS = ["prompt3", "prefix2", None, "lora"]


def _padded(batch: int, seq: int) -> dict:
    inputs = FAMILY.inputs(batch, seq)
    inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    inputs["attention_mask"][1::2, :2] = 0  # left padding on some rows
    return inputs


def _serve(entries: dict):
    """({name: own CompiledModel, None: the base}, ServedModel of them), adapters non-zero."""
    inputs = _padded(BATCH, SEQ)
    _, cms = compile_family_specs(FAMILY, {name: {"adapters": [entry]} for name, entry in entries.items()},
                                  example_kwargs=inputs)
    for seed, name in enumerate(entries):
        randomize_adapters(cms[name], std=0.5, seed=seed)
        cms[name].eval()
    mm = peftc.serve_adapters(FAMILY.build(), cms, example_kwargs=inputs)
    return {**cms, None: FAMILY.build()}, mm


@pytest.fixture(scope="module")
def linear():
    return _serve(LINEAR)


@pytest.fixture(scope="module")
def virtual():
    return _serve(VIRTUAL)


def _row(inputs: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in inputs.items()}


def _reference_loss(rows_logits: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss (mean over the batch's predicted tokens) of each row's own logits; labels -100 at padding."""
    labels = labels.masked_fill(mask == 0, -100)
    logits = torch.cat(rows_logits)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def test_first_labels_and_hidden_states_calls_derive(linear):
    """No export for either call; loss, logits and every hidden state per row equal the row's own model's."""
    models, mm = linear
    inputs = _padded(BATCH, SEQ)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with counted_exports() as exports:
        with_loss = mm(**inputs, labels=labels, use_cache=False, adapter_ids=LINEAR_ROWS)
        hidden = mm(**inputs, output_hidden_states=True, use_cache=False, adapter_ids=LINEAR_ROWS)
    assert exports == []
    own = [models[r](**_row(inputs, i), output_hidden_states=True) for i, r in enumerate(LINEAR_ROWS)]
    for i, out in enumerate(own):
        real = inputs["attention_mask"][i].bool()
        torch.testing.assert_close(with_loss.logits[i][real], out.logits[0][real], **TOL)
        for got, want in zip(hidden.hidden_states, out.hidden_states, strict=True):
            torch.testing.assert_close(got[i][real], want[0][real], **TOL)
    want_loss = _reference_loss([o.logits for o in own], labels, inputs["attention_mask"])
    torch.testing.assert_close(with_loss.loss, want_loss, **TOL)
    assert not torch.allclose(with_loss.logits[0], hidden.logits[1], **TOL)  # the rows' adapters act


@torch.no_grad()
def test_derived_graphs_keep_the_input_guards(linear):
    """A derived served graph still checks the call against export's guards (its adapter_ids are no guard input)."""
    _, mm = linear
    inputs = _padded(BATCH, SEQ)
    with pytest.raises(AssertionError, match=r"attention_mask.size\(\)\[1\] == input_ids.size\(\)\[1\]"):
        mm(input_ids=inputs["input_ids"], attention_mask=torch.ones(BATCH, SEQ + 1, dtype=torch.long),
           labels=inputs["input_ids"], use_cache=False, adapter_ids=LINEAR_ROWS)


@torch.no_grad()
def test_plain_call_returns_the_cache(linear):
    """A call saying nothing of the cache returns the DynamicCache use_cache=True returns (no export), and
    continuing it gives every row's logits over the whole sequence."""
    models, mm = linear
    inputs = _padded(BATCH, SEQ)
    with counted_exports() as exports:
        plain = mm(**inputs, adapter_ids=LINEAR_ROWS)
        asked = mm(**inputs, use_cache=True, adapter_ids=LINEAR_ROWS)
    assert exports == []
    assert plain.past_key_values is not None and len(plain.past_key_values.layers) == FAMILY.build().config.num_hidden_layers
    for got, want in zip(plain.past_key_values.layers, asked.past_key_values.layers, strict=True):
        torch.testing.assert_close(got.keys, want.keys, atol=0, rtol=0)
        torch.testing.assert_close(got.values, want.values, atol=0, rtol=0)
    torch.testing.assert_close(plain.logits, mm(**inputs, use_cache=False, adapter_ids=LINEAR_ROWS).logits, **TOL)
    step = FAMILY.inputs(BATCH, 2)["input_ids"]
    mask = torch.cat([inputs["attention_mask"], torch.ones(BATCH, 2, dtype=torch.long)], 1)
    continued = mm(input_ids=step, attention_mask=mask, past_key_values=plain.past_key_values, adapter_ids=LINEAR_ROWS)
    whole = {"input_ids": torch.cat([inputs["input_ids"], step], 1), "attention_mask": mask}
    for i, r in enumerate(LINEAR_ROWS):
        want = models[r](**_row(whole, i), use_cache=False).logits[0, -2:]
        torch.testing.assert_close(continued.logits[i], want, **TOL)


@torch.no_grad()
def test_prompt_and_prefix_rows_derive_their_plain_signatures(virtual):
    """Served prompt and prefix rows: the labels= and output_hidden_states=True calls run no export, each row's
    loss (one adapter a batch) and hidden states equal its own model's; a plain call keeps its plain graph."""
    models, mm = virtual
    inputs = _padded(BATCH, SEQ)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with counted_exports() as exports:
        hidden = mm(**inputs, output_hidden_states=True, adapter_ids=VIRTUAL_ROWS)
        losses = {name: mm(**inputs, labels=labels, adapter_ids=[name] * BATCH).loss for name in VIRTUAL}
    assert exports == []
    for name in VIRTUAL:  # the first label of a row without virtual tokens is predicted by no position
        torch.testing.assert_close(losses[name], models[name](**inputs, labels=labels).loss, **TOL)
    for i, r in enumerate(VIRTUAL_ROWS):
        want = models[r](**_row(inputs, i), output_hidden_states=True)
        for got, own in zip(hidden.hidden_states, want.hidden_states, strict=True):
            got = got[i:i + 1, got.shape[1] - own.shape[1]:]  # the row's own positions are the last ones
            real = torch.cat([torch.ones(own.shape[1] - SEQ, dtype=torch.bool), inputs["attention_mask"][i].bool()])
            torch.testing.assert_close(got[0][real], own[0][real], **TOL)
    assert mm(**inputs, adapter_ids=VIRTUAL_ROWS).get("past_key_values") is None  # cached graphs are captured


@torch.no_grad()
def test_prompt_and_prefix_rows_cached_call_is_captured_and_right(virtual):
    """use_cache=True on prompt and prefix rows captures its graph (not derived) and continues as the whole call."""
    _, mm = virtual
    inputs = _padded(BATCH, SEQ)
    first = mm(**inputs, use_cache=True, adapter_ids=VIRTUAL_ROWS)
    assert mm._cached_forward.derivation is None
    step = FAMILY.inputs(BATCH, 1)["input_ids"]
    width = mm._prompt_width
    mask = torch.cat([inputs["attention_mask"], torch.ones(BATCH, 1, dtype=torch.long)], 1)  # the caller's tokens'
    continued = mm(input_ids=step, attention_mask=mask, past_key_values=first.past_key_values, use_cache=True,
                   adapter_ids=VIRTUAL_ROWS)
    whole = mm(input_ids=torch.cat([inputs["input_ids"], step], 1),
               attention_mask=mask, use_cache=False, adapter_ids=VIRTUAL_ROWS)
    torch.testing.assert_close(continued.logits[:, -1], whole.logits[:, width + SEQ], **TOL)


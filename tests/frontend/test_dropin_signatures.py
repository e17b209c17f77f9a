"""A new call signature derives its graph from the superset capture (peftc.capture.specialize) instead
of capturing again, and returns what the original model with the same adapters returns (peft)."""

from __future__ import annotations

import pytest
import torch
from families import bert, llama, randomize_adapters
from peft_reference import peft_lora, peft_lora_grads

import peftc
from peftc.capture import kept_logits
from peftc.capture.kept_logits import kept_logits_hold

SPEC = {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}]}
# the pair's LM head has an adapter too: a logits_to_keep graph must give it the kept rows
PAIR_TARGETS = ["q_proj", "v_proj", "lm_head"]
BERT_SPEC = {"adapters": [{"method": "lora", "targets": ["query", "value"], "r": 4, "alpha": 8}]}


@pytest.fixture(scope="module")
def llama_pair():
    cm = peftc.compile(llama(), {"adapters": [{"method": "lora", "targets": PAIR_TARGETS, "r": 4, "alpha": 8}]})
    randomize_adapters(cm)
    reference = peft_lora(llama(), cm, PAIR_TARGETS, r=4, alpha=8)
    return cm.eval(), reference.eval()


def _captures(monkeypatch, cm) -> list:
    """Record every capture the compiled model's compilation makes from now on."""
    calls = []
    build = type(cm.compilation).build
    monkeypatch.setattr(type(cm.compilation), "build", lambda self, *a, **k: calls.append(a) or build(self, *a, **k))
    return calls


def _assert_same(ours, theirs) -> None:
    assert list(ours.keys()) == list(theirs.keys())
    for key in ours.keys():
        a, b = ours[key], theirs[key]
        if isinstance(a, tuple):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


CALLS = {
    "labels": lambda ids: {"labels": ids},
    "labels and num_items_in_batch (Trainer's float32)": lambda ids: {"labels": ids, "num_items_in_batch": torch.tensor(9.0)},
    "labels and an integer num_items_in_batch": lambda ids: {"labels": ids, "num_items_in_batch": torch.tensor(9)},
}


@pytest.mark.parametrize("name", list(CALLS))
def test_new_signature_is_derived_without_a_capture(llama_pair, monkeypatch, name):
    cm, reference = llama_pair
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    kwargs = CALLS[name](ids)
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours, theirs = cm(input_ids=ids, use_cache=False, **kwargs), reference(input_ids=ids, use_cache=False, **kwargs)
    assert captures == []
    _assert_same(ours, theirs)


def test_labels_mean_loss_is_the_original_mean_with_ignored_tokens(llama_pair):
    """labels without num_items_in_batch: the derived graph takes the mean (mean_from_sum)."""
    cm, reference = llama_pair
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        ours, theirs = cm(input_ids=ids, labels=labels).loss, reference(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_derived_graph_trains_the_shared_adapters(llama_pair):
    cm, reference = llama_pair
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    cm.train(), reference.train()
    try:
        cm(input_ids=ids, labels=ids).loss.backward()
        reference(input_ids=ids, labels=ids).loss.backward()
    finally:
        cm.eval(), reference.eval()
    ours = {n: p.grad for n, p in cm.named_parameters() if p.grad is not None}
    theirs = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert len(ours) == len(theirs) > 0
    for a, b in zip(sorted(g.norm().item() for g in ours.values()), sorted(g.norm().item() for g in theirs.values())):
        assert abs(a - b) <= 1e-4 * max(1.0, b)
    cm.zero_grad(), reference.zero_grad()


def test_sequence_classifier_labels_are_derived_and_config_is_untouched(monkeypatch):
    model = bert()
    cm = peftc.compile(model, BERT_SPEC).eval()
    randomize_adapters(cm)
    reference = peft_lora(bert(), cm, ["query", "value"], r=4, alpha=8)
    assert model.config.problem_type is None  # the superset capture's labels did not set it
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 2, 1])
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours, theirs = cm(input_ids=ids, labels=labels), reference.eval()(input_ids=ids, labels=labels)
    assert captures == []
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)


def test_hidden_states_compiled_in_are_dropped_without_a_capture(monkeypatch):
    """output_hidden_states=True in the example call: calls without it (and with labels) derive."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    cm = peftc.compile(llama(), SPEC, example_kwargs={"input_ids": ids, "output_hidden_states": True}).eval()
    randomize_adapters(cm)
    reference = peft_lora(llama(), cm, ["q_proj", "v_proj"], r=4, alpha=8).eval()
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        for kwargs in ({}, {"labels": ids}, {"output_hidden_states": True, "labels": ids}):
            _assert_same(cm(input_ids=ids, use_cache=False, **kwargs), reference(input_ids=ids, use_cache=False, **kwargs))
    assert captures == []


def test_a_derived_graph_keeps_the_input_guards(llama_pair):
    """A labels call whose mask is shorter than its ids fails as the original does, not inside the graph."""
    cm, reference = llama_pair
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(Exception) as ours:
        cm(input_ids=ids, attention_mask=mask, labels=ids)
    try:
        reference(input_ids=ids, attention_mask=mask, labels=ids)
    except Exception as err:  # the original's error, reproduced
        assert type(ours.value) is type(err)
    else:
        assert isinstance(ours.value, peftc.CallError) and "attention_mask" in str(ours.value)


def test_a_signature_outside_the_superset_still_captures(llama_pair, monkeypatch):
    """logits_to_keep where its check fails (peftc.capture.kept_logits; where it holds the graph is derived:
    test_dropin_logits_to_keep.py): the int stays a constant the captured graph is specialized on."""
    cm, reference = llama_pair
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(kept_logits, "kept_logits_hold", lambda model: False)
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours, theirs = cm(input_ids=ids, logits_to_keep=2), reference(input_ids=ids, logits_to_keep=2, use_cache=False)
    assert len(captures) == 1 and captures[0][1]["logits_to_keep"] == 2 and ours.logits.shape[1] == 2
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)


def test_position_ids_are_derived_both_ways(llama_pair, monkeypatch):
    """The superset takes position_ids; calls without them compute LLaMA's default in the graph."""
    cm, reference = llama_pair
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    position_ids = torch.arange(6).unsqueeze(0).expand(2, -1) + 1
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        for kwargs in ({"position_ids": position_ids}, {"position_ids": position_ids, "labels": ids}, {}):
            _assert_same(cm(input_ids=ids, use_cache=False, **kwargs), reference(input_ids=ids, use_cache=False, **kwargs))
    assert captures == []


def test_a_refused_superset_gives_way_to_the_loss_only_one(monkeypatch):
    """A model whose capture refuses the output flags still gets labels derived from a narrower superset."""
    from peftc.compiler.compilation import Compilation
    build = Compilation.build

    def refusing(self, args, kwargs, plan, **options):
        if "output_hidden_states" in kwargs:
            raise peftc.CaptureError("this model refuses output_hidden_states")
        return build(self, args, kwargs, plan, **options)

    monkeypatch.setattr(Compilation, "build", refusing)
    cm = peftc.compile(llama(), SPEC).eval()
    randomize_adapters(cm)
    reference = peft_lora(llama(), cm, ["q_proj", "v_proj"], r=4, alpha=8).eval()
    assert "labels" in cm._superset[1] and "output_hidden_states" not in cm._superset[1]
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        _assert_same(cm(input_ids=ids, labels=ids, use_cache=False), reference(input_ids=ids, labels=ids, use_cache=False))
    assert captures == []


def test_vit_labels_and_hidden_states_are_derived(monkeypatch):
    """ViT's capture takes the batch size from `labels`: derivation reads it from pixel_values instead."""
    from families import vit, vit_inputs
    cm = peftc.compile(vit(), SPEC, example_kwargs=vit_inputs(2, 0)).eval()
    randomize_adapters(cm)
    reference = peft_lora(vit(), cm, ["q_proj", "v_proj"], r=4, alpha=8).eval()
    pixels, labels = vit_inputs(3, 0)["pixel_values"], torch.tensor([0, 4, 2])
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        for kwargs in ({}, {"labels": labels}, {"output_hidden_states": True, "labels": labels}):
            _assert_same(cm(pixel_values=pixels, **kwargs), reference(pixel_values=pixels, **kwargs))
    assert captures == []


# -- logits_to_keep: derived with positions as a graph input (peftc.capture.kept_logits) -----------------
KEEPS = {"last 1": 1, "last 3": 3, "more than the sequence": 10, "negative": -2,
         "positions": torch.tensor([6, 0, 3]), "int32 positions": torch.tensor([2, 5], dtype=torch.int32)}


def _keep_call():
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


def test_every_form_is_derived_and_equals_peft(llama_pair, monkeypatch):
    """Ints (one graph for all of them) and index tensors, under no_grad: no capture, PEFT's logits."""
    cm, reference = llama_pair
    ids, mask = _keep_call()
    captures = _captures(monkeypatch, cm)
    before = len(cm.graphs)
    with torch.no_grad():
        for keep in KEEPS.values():
            ours = cm(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)  # the plain graphs
            theirs = reference(input_ids=ids, attention_mask=mask, logits_to_keep=keep, use_cache=False)
            assert ours.logits.shape == theirs.logits.shape
            torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    assert captures == []
    assert len(cm.graphs) - before == 2  # the int64 positions (every int k) and the int32 ones


def test_labels_of_the_kept_length_give_peft_loss_and_gradients(llama_pair):
    """transformers computes the loss on the kept logits (labels [batch, kept]): so does the derived graph,
    and it trains the adapters as PEFT's does, in both forms."""
    cm, reference = llama_pair
    ids, mask = _keep_call()
    labels = torch.randint(0, 128, (2, 3), generator=torch.Generator().manual_seed(2))
    cm.train(), reference.train()
    try:
        for keep in (3, torch.tensor([1, 4, 6])):
            cm.zero_grad(), reference.zero_grad()
            ours = cm(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=keep)
            theirs = reference(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=keep, use_cache=False)
            torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
            (ours.loss + ours.logits.square().mean()).backward()
            (theirs.loss + theirs.logits.square().mean()).backward()
            expected = peft_lora_grads(reference)
            got = {name: p.grad for name, p in cm.adapter_root.named_parameters()}
            assert got.keys() == expected.keys() and got["lm_head.lora.B"].abs().sum() > 0
            for name, grad in got.items():
                torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-5)
    finally:
        cm.eval(), reference.eval()


def test_labels_of_another_length_fail_as_the_original_does(llama_pair):
    cm, reference = llama_pair
    ids, _ = _keep_call()
    with torch.no_grad(), pytest.raises(ValueError, match="Expected input batch_size") as ours:
        cm(input_ids=ids, labels=ids, logits_to_keep=3)
    with torch.no_grad(), pytest.raises(ValueError) as theirs:
        reference(input_ids=ids, labels=ids, logits_to_keep=3, use_cache=False)
    assert str(ours.value) == str(theirs.value)


def test_inputs_embeds_with_logits_to_keep_is_derived(llama_pair, monkeypatch):
    cm, reference = llama_pair
    ids, mask = _keep_call()
    embeds = reference.get_input_embeddings()(ids).detach()
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours = cm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=2)
        theirs = reference(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=2, use_cache=False)
    assert captures == []
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)


class IgnoresLogitsToKeep(torch.nn.Module):
    """A model taking logits_to_keep that does not slice by it: the check refuses it."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.main_input_name = model, model.config, "input_ids"

    def forward(self, input_ids=None, attention_mask=None, use_cache=None, logits_to_keep=0):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_the_check_refuses_a_model_that_reads_logits_to_keep_otherwise(llama_pair):
    cm, _ = llama_pair
    assert kept_logits_hold(cm.compilation.source)
    assert not kept_logits_hold(IgnoresLogitsToKeep(llama()))

"""A call with inputs_embeds in place of input_ids gets a graph derived from the superset capture
(peftc.capture.embeds_input), not a capture, and computes what PEFT computes from those embeddings."""

from __future__ import annotations

import pytest
import torch
from families import bert, gpt2, llama, randomize_adapters
from peft_reference import peft_lora, peft_lora_grads

import peftc
from peftc.capture.embeds_input import embeds_hold

FAMILIES = {"llama": (llama, ["q_proj", "v_proj"]), "gpt2": (gpt2, ["c_attn"]), "bert": (bert, ["query", "value"])}


def _lora(targets):
    return {"adapters": [{"method": "lora", "targets": targets, "r": 4, "alpha": 8}]}


def _captures(monkeypatch, cm) -> list:
    """Record every capture the compiled model's compilation makes from now on."""
    calls = []
    build = type(cm.compilation).build
    monkeypatch.setattr(type(cm.compilation), "build", lambda self, *a, **k: calls.append(a) or build(self, *a, **k))
    return calls


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request):
    build, targets = FAMILIES[request.param]
    cm = peftc.compile(build(), _lora(targets))
    randomize_adapters(cm)
    reference = peft_lora(build(), cm, targets, r=4, alpha=8)
    return cm.eval(), reference.eval(), request.param


def _padded_call(family: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Token ids and the mask and labels of a call (row 0 left-padded), for both models."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = torch.randint(0, 3, (3,), generator=g) if family == "bert" else ids.masked_fill(mask == 0, -100)
    return ids, {"attention_mask": mask, "labels": labels}


def _reference_kwargs(family: str) -> dict:
    return {} if family == "bert" else {"use_cache": False}


def test_inputs_embeds_is_derived_and_trains_as_peft(pair, monkeypatch):
    """Loss, logits and gradients (adapters and the embeddings themselves) equal PEFT's, without a capture."""
    cm, reference, family = pair
    ids, kwargs = _padded_call(family)
    embeds = reference.get_input_embeddings()(ids).detach()
    ours_in, theirs_in = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    captures = _captures(monkeypatch, cm)
    cm.zero_grad()
    reference.zero_grad()
    ours = cm(inputs_embeds=ours_in, **kwargs)
    theirs = reference(inputs_embeds=theirs_in, **kwargs, **_reference_kwargs(family))
    ours.loss.backward()
    theirs.loss.backward()
    assert captures == []
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)
    assert ours_in.grad is not None and ours_in.grad.abs().sum() > 0  # the gradient reaches inputs_embeds
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-5, rtol=1e-5)
    expected = peft_lora_grads(reference)
    got = {name: p.grad for name, p in cm.adapter_root.named_parameters()}
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_without_labels_or_mask_is_derived(pair, monkeypatch):
    """The narrower calls (no labels, no mask: all ones as transformers reads it) are derived too."""
    cm, reference, family = pair
    ids, _ = _padded_call(family, seed=1)
    embeds = reference.get_input_embeddings()(ids).detach()
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours = cm(inputs_embeds=embeds, output_hidden_states=True)
        theirs = reference(inputs_embeds=embeds, output_hidden_states=True, **_reference_kwargs(family))
        by_ids = cm(input_ids=ids)
    assert captures == []
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logits, by_ids.logits, atol=1e-5, rtol=1e-5)  # embeddings of those ids


def test_both_input_ids_and_inputs_embeds_raise_the_originals_error(pair):
    cm, reference, family = pair
    ids, _ = _padded_call(family)
    embeds = reference.get_input_embeddings()(ids).detach()
    with pytest.raises(ValueError) as theirs:
        reference.base_model.model(input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(ValueError) as ours:
        cm(input_ids=ids, inputs_embeds=embeds)
    assert str(ours.value) == str(theirs.value)


def _llama_classifier():
    """A classifier that finds each row's last real token from the ids' pad tokens (with inputs_embeds:
    the last position), so its output from ids and from their embeddings differ."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, num_labels=3,
                      pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def test_a_model_the_check_refuses_captures_and_is_right(monkeypatch):
    model = _llama_classifier()
    assert not embeds_hold(model)
    cm = peftc.compile(model, _lora(["q_proj", "v_proj"])).eval()
    randomize_adapters(cm)
    reference = peft_lora(_llama_classifier(), cm, ["q_proj", "v_proj"], r=4, alpha=8).eval()
    ids = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    ids[1, -2:] = 0  # right padding: the ids' last real token is not the last position
    embeds = model.get_input_embeddings()(ids).detach()
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours, theirs = cm(inputs_embeds=embeds), reference(inputs_embeds=embeds)
        by_ids = cm(input_ids=ids)
    assert len(captures) == 1
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours.logits[1], by_ids.logits[1])  # the case the check is for


def test_gemma_embeddings_are_not_scaled_twice(monkeypatch):
    """Gemma scales by sqrt(hidden) inside its embedding module: embeddings passed in are taken as they are."""
    from transformers import GemmaConfig, GemmaForCausalLM

    def gemma():
        torch.manual_seed(0)
        return GemmaForCausalLM(GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                            vocab_size=64, max_position_embeddings=64)).eval()
    cm = peftc.compile(gemma(), _lora(["q_proj", "v_proj"])).eval()
    randomize_adapters(cm)
    reference = peft_lora(gemma(), cm, ["q_proj", "v_proj"], r=4, alpha=8).eval()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    embeds = reference.get_input_embeddings()(ids).detach()
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours = cm(inputs_embeds=embeds, labels=ids)
        theirs = reference(inputs_embeds=embeds, labels=ids, use_cache=False)
    assert captures == []
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)


def test_prompt_tuning_prepends_to_inputs_embeds_as_peft_does(monkeypatch):
    """PEFT's PeftModelForCausalLM prepends the virtual tokens to the inputs_embeds it is given (and ones
    to the mask, -100 to the labels): so does the derived graph."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    cm = peftc.compile(llama(), {"adapters": [{"method": "prompt", "num_tokens": 3}]}).eval()
    randomize_adapters(cm)
    (prompt,) = cm.adapter_state_dict().values()
    reference = get_peft_model(llama(), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    with torch.no_grad():
        reference.prompt_encoder.default.embedding.weight.copy_(prompt)
    reference.eval()
    ids, kwargs = _padded_call("llama", seed=4)
    embeds = reference.get_input_embeddings()(ids).detach()
    captures = _captures(monkeypatch, cm)
    with torch.no_grad():
        ours, theirs = cm(inputs_embeds=embeds, **kwargs), reference(inputs_embeds=embeds, **kwargs)
    assert captures == []
    assert ours.logits.shape == (3, 6 + 3, 128)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)

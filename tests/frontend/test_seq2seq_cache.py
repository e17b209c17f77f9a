"""generate() on T5 and BART decodes over cached graphs, against real PEFT's cached generate.

LoRA on q and v of every attention, the decoder's cross-attention included (T5 `EncDecAttention.q/v`,
BART `encoder_attn.q_proj/v_proj`), so the precomputed cross keys and values carry an adapter. What
proves the cache is used: the encoder graph runs once per generate(), the first decoder step once,
every later step on a one-token decoder input, and the compiled forward (the uncached path) never.
"""

from __future__ import annotations

import copy

import pytest
import torch

import peftc
from families import MORE_FAMILIES, randomize_adapters


@pytest.fixture(scope="module", params=["t5", "bart"])
def pair(request, tmp_path_factory):
    """(family, compiled model, PEFT's model loaded from the compiled model's PEFT folder)."""
    from peft import PeftModel

    family = MORE_FAMILIES[request.param]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": list(family.targets), "r": 4,
                                             "alpha": 8}]}).eval()
    randomize_adapters(cm, std=0.3)
    folder = tmp_path_factory.mktemp(family.name)
    cm.save_adapter(folder, format="peft")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    return family, cm, reference


def prompts(family, pad: int):
    ids = family.inputs(2, 7)["input_ids"]
    mask = torch.ones_like(ids)
    ids[1, -3:], mask[1, -3:] = pad, 0  # the second row 3 tokens shorter
    return ids, mask


def test_cross_attention_is_adapted(pair):
    family, cm, _ = pair
    cross = "EncDecAttention" if family.name == "t5" else "encoder_attn"
    assert any(cross in name for name in cm.adapter_state_dict())


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_tokens_equal_peft(pair, padded):
    family, cm, reference = pair
    ids, mask = prompts(family, reference.config.pad_token_id)
    if not padded:
        mask = torch.ones_like(mask)
    ours = cm.generate(ids, attention_mask=mask, max_new_tokens=10)
    with torch.no_grad():
        theirs = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(ours, theirs)


def test_seeded_sampling_is_reproducible_and_equals_peft(pair):
    family, cm, reference = pair
    ids, mask = prompts(family, reference.config.pad_token_id)
    options = {"max_new_tokens": 10, "do_sample": True, "top_k": 20, "temperature": 1.5}
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(cm.generate(ids, attention_mask=mask, **options))
    torch.manual_seed(3)
    with torch.no_grad():
        theirs = reference.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], theirs)


def test_the_encoder_runs_once_and_each_later_step_on_one_token(pair):
    family, cm, reference = pair
    ids, mask = prompts(family, reference.config.pad_token_id)
    cm.generate(ids, attention_mask=mask, max_new_tokens=10)  # builds the graphs of this shape
    generator = cm._generator
    graphs = generator.steps[(2, 7, 32)]
    calls = {"encoder": 0, "first": 0, "step": []}
    forward_calls = []

    def count(name):
        def hook(module, args, kwargs):
            if name == "step":
                calls["step"].append(kwargs["decoder_input_ids"].shape[1])
            else:
                calls[name] += 1
        return hook

    handles = [generator.encoder_graph.register_forward_pre_hook(count("encoder"), with_kwargs=True),
               graphs.first.register_forward_pre_hook(count("first"), with_kwargs=True),
               graphs.step.register_forward_pre_hook(count("step"), with_kwargs=True),
               cm.register_forward_pre_hook(lambda *_: forward_calls.append(1))]
    try:
        out = cm.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    finally:
        for handle in handles:
            handle.remove()
    assert out.shape[1] == 11  # the start token and 10 new ones: no eos cut it short
    assert calls["encoder"] == 1 and calls["first"] == 1
    assert calls["step"] == [1] * 9  # the 2nd..10th tokens' logits, each from one decoder token
    assert not forward_calls


def test_merged_model_generates_the_same_tokens(pair):
    family, cm, reference = pair
    ids, mask = prompts(family, reference.config.pad_token_id)
    merged = cm.merged()
    assert torch.equal(merged.generate(ids, attention_mask=mask, max_new_tokens=8),
                       cm.generate(ids, attention_mask=mask, max_new_tokens=8))

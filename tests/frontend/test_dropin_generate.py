"""cm.generate(): StaticCache inside the compiled graphs; tokens equal HF PEFT's generate."""

from __future__ import annotations

import pytest
import torch

import peftc
from families import FAMILIES, randomize_adapters
from peft_reference import peft_lora

R, ALPHA = 4, 8


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    family = FAMILIES[request.param]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": list(family.targets), "r": R,
                                             "alpha": ALPHA}]})
    randomize_adapters(cm)
    reference = peft_lora(model, cm, family.targets, R, ALPHA).eval()
    return cm.eval(), reference


def prompts(padded: bool):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 128, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    if padded:  # left padding, as transformers expects for decoder-only models
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_tokens_equal_peft(pair, padded):
    cm, reference = pair
    ids, mask = prompts(padded)
    ours = cm.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    theirs = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                pad_token_id=0)
    assert ours.shape == (2, 18)
    assert torch.equal(ours, theirs)


def test_sampling_with_a_seed_is_reproducible(pair):
    cm, _ = pair
    ids, mask = prompts(True)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(cm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, top_k=20,
                                temperature=0.8))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(12)
    assert not torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True,
                                       temperature=2.0), runs[0])


def test_merged_model_generates_the_same_tokens(pair):
    cm, _ = pair
    ids, mask = prompts(True)
    expected = cm.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(cm.merged().generate(ids, attention_mask=mask, max_new_tokens=8), expected)


def test_generation_stops_at_eos_and_pads_finished_rows(pair):
    cm, _ = pair
    ids, mask = prompts(False)
    free = cm.generate(ids, attention_mask=mask, max_new_tokens=8)
    eos = int(free[0, 6])  # the first token row 0 generates
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert out[0, 6] == eos and (out[0, 7:] == 0).all()
    assert torch.equal(out[1, :7], free[1, :7])


def test_generate_graphs_share_the_adapter_parameters(pair):
    cm, _ = pair
    ids, mask = prompts(False)
    before = cm.generate(ids, attention_mask=mask, max_new_tokens=6)
    with torch.no_grad():
        for tensor in cm.adapter_state_dict().values():
            tensor.mul_(-3.0)
    try:
        assert not torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6), before)
    finally:
        with torch.no_grad():
            for tensor in cm.adapter_state_dict().values():
                tensor.div_(-3.0)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6), before)


def test_unknown_and_unsupported_arguments_are_errors(pair):
    cm, _ = pair
    ids, _ = prompts(False)
    with pytest.raises(TypeError, match="max_new_tokenz"):
        cm.generate(ids, max_new_tokenz=3)
    with pytest.raises(NotImplementedError, match="num_beams"):
        cm.generate(ids, max_new_tokens=3, num_beams=2)


def test_a_model_that_cannot_generate_says_so():
    cm = peftc.compile(FAMILIES["bert"].build(), {"adapters": [{"method": "lora", "targets": ["query"], "r": 2}]})
    assert not cm.can_generate()
    with pytest.raises(TypeError, match="cannot generate"):
        cm.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2)

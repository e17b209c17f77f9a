"""An input whose default the model computes joins the superset only where the default is checked to hold
for that model (peftc.capture.input_defaults); elsewhere a call passing it captures, and is still right."""

from __future__ import annotations

import pytest
import torch
from families import bert, falcon, gpt2, llama, randomize_adapters
from peft_reference import peft_lora

import peftc
from peftc.capture.input_defaults import default_holds, flag_only_adds_outputs


def opt():
    """OPT computes its default positions from the attention mask's cumulative sum, not arange."""
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    cfg = OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=2, vocab_size=64,
                    max_position_embeddings=64, word_embed_proj_dim=32)
    return OPTForCausalLM(cfg).eval()


@pytest.mark.parametrize("build, name, holds", [
    (llama, "position_ids", True),
    (bert, "position_ids", True),
    (bert, "token_type_ids", True),
    (gpt2, "position_ids", True),
    (gpt2, "token_type_ids", False),  # GPT-2 adds a token-type embedding only when they are passed
    (opt, "position_ids", False),  # positions follow the mask's padding
])
def test_the_check_tells_which_defaults_hold(build, name, holds):
    model = build()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    assert default_holds(model, (name,)) is holds
    assert not model.training  # the check puts the modes back
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_default_that_does_not_hold_stays_out_of_the_superset_and_a_call_captures(monkeypatch):
    model = opt()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4}]}).eval()
    randomize_adapters(cm)
    reference = peft_lora(opt(), cm, ["q_proj", "v_proj"], r=4, alpha=8).eval()
    assert "position_ids" not in cm._superset[1]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    captures = []
    build = type(cm.compilation).build
    monkeypatch.setattr(type(cm.compilation), "build", lambda self, *a, **k: captures.append(a) or build(self, *a, **k))
    with torch.no_grad():
        for kwargs in ({"attention_mask": mask}, {"attention_mask": mask, "position_ids": position_ids}):
            ours = cm(input_ids=ids, **kwargs).logits
            theirs = reference(input_ids=ids, use_cache=False, **kwargs).logits
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert len(captures) == 1  # the call with position_ids


def test_one_row_of_positions_for_the_batch_takes_the_superset_graph(monkeypatch):
    """`position_ids=arange(seq)[None]` with a batch of 3: LLaMA reads the row for every example (checked),
    so the call is expanded to the superset's one row per example instead of failing its guard."""
    cm = peftc.compile(llama(), {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4}]}).eval()
    randomize_adapters(cm)
    reference = peft_lora(llama(), cm, ["q_proj", "v_proj"], r=4, alpha=8).eval()
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(1))
    row = torch.arange(6).unsqueeze(0) + 4
    captures = []
    build = type(cm.compilation).build
    monkeypatch.setattr(type(cm.compilation), "build", lambda self, *a, **k: captures.append(a) or build(self, *a, **k))
    with torch.no_grad():
        ours = cm(input_ids=ids, position_ids=row).logits
        theirs = reference(input_ids=ids, position_ids=row, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert captures == []


@pytest.mark.parametrize("build, flag, only_adds", [
    (llama, "output_hidden_states", True),
    (llama, "output_attentions", True),
    (bert, "output_attentions", True),
    (falcon, "output_attentions", False),  # asking for the weights switches Falcon's attention code
])
def test_the_check_tells_which_output_flags_only_add_outputs(build, flag, only_adds):
    assert flag_only_adds_outputs(build(), flag) is only_adds


def test_a_flag_that_changes_the_computation_stays_out_of_the_superset(monkeypatch):
    model = falcon()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["query_key_value"], "r": 4}]}).eval()
    randomize_adapters(cm)
    reference = peft_lora(falcon(), cm, ["query_key_value"], r=4, alpha=8).eval()
    assert "output_attentions" not in cm._superset[1] and "output_hidden_states" in cm._superset[1]
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for kwargs in ({}, {"output_attentions": True}):
            ours, theirs = cm(input_ids=ids, **kwargs), reference(input_ids=ids, use_cache=False, **kwargs)
            torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)

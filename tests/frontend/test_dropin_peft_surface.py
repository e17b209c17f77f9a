"""What a script written for a PeftModel calls on it, called on a compiled model instead.

print_trainable_parameters / get_nb_trainable_parameters, disable_adapter(), save_pretrained that
PeftModel.from_pretrained reads, enable_input_require_grads (TRL calls it on PEFT models) that leaves
the user's model alone, checkpointing's use_reentrant, and accelerate's prepare loop.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import peftc
from families import FAMILIES, randomize_adapters
from peft_reference import peft_lora

TARGETS = ("q_proj", "v_proj")


@functools.cache
def _compiled():
    """The file's one compile (seconds of torch.export; a deepcopy runs none): the base model and its compiled
    LoRA, adapters randomized, never called."""
    model = FAMILIES["llama"].build()
    cm = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": list(TARGETS),
                                                            "r": 4, "alpha": 8}]})
    randomize_adapters(cm)
    return model, cm


def pair():
    """(base, a compiled model of its own: a deepcopy of the file's compile, tested independent in
    test_dropin_module.py and test_capture_reuse.py, and PEFT's model with the same adapter weights)."""
    model, compiled = _compiled()
    cm = copy.deepcopy(compiled)
    return model, cm, peft_lora(model, cm, TARGETS, 4, 8)


@pytest.fixture(scope="module")
def shared_pair():
    """pair(), made once, for the tests that only read it (or change it and put it back)."""
    return pair()


def ids(batch=2, seq=5):
    return FAMILIES["llama"].inputs(batch, seq)["input_ids"]


def test_trainable_parameter_counts_equal_peft(capsys, shared_pair):
    _, cm, reference = shared_pair
    assert cm.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    cm.print_trainable_parameters()
    ours = capsys.readouterr().out
    reference.print_trainable_parameters()
    assert ours == capsys.readouterr().out and ours.startswith("trainable params: ")


def test_disable_adapter_runs_the_base_model_and_restores_the_adapters(shared_pair):
    model, cm, _ = shared_pair
    x = ids()
    with torch.no_grad():
        adapted = cm.eval()(input_ids=x).logits
        with cm.disable_adapter():
            plain = cm(input_ids=x).logits
        again = cm(input_ids=x).logits
        torch.testing.assert_close(plain, model(input_ids=x).logits)
    assert not torch.allclose(plain, adapted, atol=1e-4)
    torch.testing.assert_close(again, adapted)


def test_save_pretrained_is_read_by_peft_and_by_peftc(tmp_path):
    from peft import PeftModel

    model, cm, _ = pair()
    cm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    fresh = peftc.compile(copy.deepcopy(model), cm.spec).load_adapter(tmp_path).eval()
    x = ids()
    with torch.no_grad():
        expected = cm.eval()(input_ids=x).logits
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh(input_ids=x).logits, expected)


def test_save_pretrained_of_a_method_peft_lacks_writes_peftc_files(tmp_path):
    model = FAMILIES["llama"].build()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj"], "r": 2},
                                            {"method": "ia3", "targets": ["v_proj"]}]})
    cm.save_pretrained(tmp_path)  # two methods in one adapter: no PEFT config holds it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "spec.json"]


def test_enable_input_require_grads_leaves_the_users_model_alone():
    _, cm, _ = pair()
    embeddings = cm.compilation.source.get_input_embeddings()
    cm.enable_input_require_grads()
    assert not embeddings._forward_hooks  # transformers' version would hook the user's embedding layer
    cm.gradient_checkpointing_enable()
    loss = cm.train()(input_ids=ids(), labels=ids()).loss
    loss.backward()
    assert all(p.grad is not None for p in cm.parameters() if p.requires_grad)
    cm.disable_input_require_grads()


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpointing_kwargs_use_reentrant_give_the_plain_gradients(use_reentrant):
    _, cm, _ = pair()
    x = ids(2, 6)

    def gradients():
        cm.zero_grad()
        cm.train()(input_ids=x, labels=x).loss.backward()
        return [p.grad.clone() for p in cm.parameters() if p.requires_grad]

    plain = gradients()
    cm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert cm.is_gradient_checkpointing
    for ours, theirs in zip(gradients(), plain, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_accelerate_prepare_loop_equals_peft():
    from accelerate import Accelerator

    _, cm, reference = pair()
    x = ids(2, 6)
    losses = []
    for model in (cm, reference):
        accelerator = Accelerator(cpu=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x}] * 3, batch_size=None)
        prepared, optimizer, loader = accelerator.prepare(model.train(), optimizer, loader)
        run = []
        for batch in loader:
            loss = prepared(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert losses[0][0] != losses[0][-1]  # it trained


def test_adapter_names_are_peft_single_adapter_ones(shared_pair):
    _, cm, reference = shared_pair
    assert cm.active_adapter == reference.active_adapter == "default"
    assert cm.active_adapters == reference.active_adapters == ["default"]
    cm.set_adapter("default")
    with pytest.raises(ValueError, match="serve_adapters"):
        cm.set_adapter("other")
    assert cm.get_base_model() is cm  # the base model with its adapters, as PeftModel.get_base_model() runs

"""Activation checkpointing as a graph rewrite: equal gradients, less saved for backward, PEFT parity."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import peftc
from families import FAMILIES, call, logits, randomize_adapters
from peftc.ir.outline import layer_regions
from peftc.ir.layer_program import CompiledLayer

LORA = {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1}


def saved_bytes(run) -> tuple[torch.Tensor, int]:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    return loss, total


def loss_of(module, family, x):
    out = logits(call(module, family, x))
    return out.float().pow(2).mean()


def grads(module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@functools.cache
def _compiled(name):
    """One compile per family for the file (seconds of torch.export; a deepcopy runs none), never called."""
    family = FAMILIES[name]
    cm = peftc.compile(family.build(), {"adapters": [{**LORA, "targets": list(family.targets)}]})
    randomize_adapters(cm)
    return cm.train()


def compiled(name):
    """(family, a compiled model in train mode of its own: a deepcopy of the file's compile of `name`)."""
    return FAMILIES[name], copy.deepcopy(_compiled(name))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_checkpointed_gradients_equal_plain_ones_and_less_is_saved(name):
    family, cm = compiled(name)
    x = family.inputs(2, 6)

    def step():
        torch.manual_seed(3)  # dropout masks: recomputation must replay the same ones
        loss, saved = saved_bytes(lambda: loss_of(cm, family, x))
        loss.backward()
        return loss.detach(), saved, grads(cm)

    plain_loss, plain_saved, plain_grads = step()
    cm.zero_grad()
    cm.gradient_checkpointing_enable()
    assert cm.is_gradient_checkpointing
    ckpt_loss, ckpt_saved, ckpt_grads = step()
    assert [m.checkpointed for m in cm.modules() if isinstance(m, CompiledLayer)] == [True, True]
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for key in plain_grads:
        torch.testing.assert_close(ckpt_grads[key], plain_grads[key], rtol=1e-5, atol=1e-6)
    assert ckpt_saved < plain_saved


def test_saved_bytes_halve_and_match_peft_with_its_checkpointing():
    from peft import LoraConfig, get_peft_model

    family = FAMILIES["llama"]
    model = family.build()
    cm = peftc.compile(copy.deepcopy(model), {"adapters": [{**LORA, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}]})
    reference = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cm.train(), reference.train()
    ids = family.inputs(4, 32)["input_ids"]
    _, plain = saved_bytes(lambda: cm(input_ids=ids, labels=ids).loss)
    cm.gradient_checkpointing_enable()
    _, ours = saved_bytes(lambda: cm(input_ids=ids, labels=ids).loss)
    _, theirs = saved_bytes(lambda: reference(input_ids=ids, labels=ids).loss)
    assert ours <= plain / 2
    assert ours <= theirs


def test_disable_and_eval_run_the_layers_plainly():
    family, cm = compiled("llama")
    x = family.inputs(2, 6)
    cm.eval()
    with torch.no_grad():
        before = logits(cm(**x))
    cm.gradient_checkpointing_enable()
    with torch.no_grad():
        torch.testing.assert_close(logits(cm(**x)), before)
    cm.train()
    _, on = saved_bytes(lambda: loss_of(cm, family, x))
    cm.gradient_checkpointing_disable()
    assert not cm.is_gradient_checkpointing
    _, off = saved_bytes(lambda: loss_of(cm, family, x))
    assert on < off


def test_regions_follow_the_layer_stack_and_no_layer_is_split():
    family, cm = compiled("llama")
    regions = layer_regions(cm.flat_graph_module)
    assert [r.path for r in regions] == ["model.layers.0", "model.layers.1"]
    assert not set(regions[0].nodes) & set(regions[1].nodes)


def test_a_model_without_layer_stacks_is_left_alone():
    family = FAMILIES["mlp"]
    cm = peftc.compile(family.build(), {"adapters": [{**LORA, "targets": ["fc1"]}]},
                       example_inputs=family.example_inputs())
    code = cm.graph_module.code
    cm.gradient_checkpointing_enable()
    assert cm.graph_module.code == code


def test_every_n_layers_checkpoints_layers_0_n_2n():
    family, cm = compiled("llama")
    cm.gradient_checkpointing_enable(every_n_layers=2)
    cm(**family.inputs(2, 6))
    layers = [m for m in cm.modules() if isinstance(m, CompiledLayer)]
    assert [layer.checkpointed for layer in layers] == [True, False]
    with pytest.raises(NotImplementedError, match="offload"):
        cm.gradient_checkpointing_enable(offload=True)

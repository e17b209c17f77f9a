"""skip_causal_masks: SDPA runs causally without its mask when the mask is only causal; equal outputs,
gradients and train/eval dropout either way, less saved for backward, no-op without a boolean mask."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, randomize_adapters
from plan_steps import without_steps

import peftc
from peftc.inspect.memory import saved_for_backward
from peftc.ir.causal_attention import attention, mask_unless_causal
from peftc.ir.modes import MODE_KEY
from peftc.passes.skip_causal_masks import PASS

aten = torch.ops.aten
ATOL = 1e-6
GRAD_ATOL = 1e-5  # grouped-query SDPA sums each key/value head's gradient in another order
LLAMA = FAMILIES["llama"]


def spec() -> dict:
    return {"adapters": [{"method": "lora", "targets": list(LLAMA.targets), "r": 4, "alpha": 8}]}


def batch(padded: bool) -> dict:
    inputs = LLAMA.inputs(2, 12)
    mask = torch.ones_like(inputs["input_ids"])
    if padded:
        mask[1, :4] = 0  # left padding in the second row
    return {**inputs, "attention_mask": mask, "labels": inputs["input_ids"]}


def compiled(model, skip: bool):
    def build():
        cm = peftc.compile(copy.deepcopy(model), spec(), example_kwargs=batch(False))
        randomize_adapters(cm)
        for padded in (False, True):  # every graph a test calls is built here, with or without the pass
            cm(**batch(padded))
        return cm
    if skip:
        return build()
    with without_steps(PASS):
        return build()


@pytest.fixture(scope="module")
def pair():
    model = LLAMA.build()
    return compiled(model, skip=True), compiled(model, skip=False)


def nodes(cm, target) -> list:
    return [n for n in cm.flat_graph_module.graph.nodes if n.target is target]


def train_step(cm, inputs):
    cm.train()
    cm.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = cm(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in cm.named_parameters() if p.requires_grad}


def test_every_attention_reads_one_checked_mask(pair):
    ours, plain = pair
    assert len(nodes(plain, aten.scaled_dot_product_attention.default)) == 2  # one per layer
    assert nodes(ours, aten.scaled_dot_product_attention.default) == []
    checks, layers = nodes(ours, mask_unless_causal), nodes(ours, attention)
    assert len(checks) == 1 and len(layers) == 2
    assert all(n.args[3] is checks[0] or n.kwargs.get("attn_mask") is checks[0] for n in layers)
    assert all(n.kwargs["kv_repeats"] == 2 for n in layers)  # 4 query heads over 2 key/value heads
    assert len(nodes(plain, aten.expand.default)) - len(nodes(ours, aten.expand.default)) == 2 * 2  # repeat_kv's


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_outputs_and_gradients_equal_the_masked_graph(pair, padded):
    ours, plain = pair
    inputs = batch(padded)
    for cm in (ours, plain):
        cm.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, plain(**inputs).logits, rtol=0, atol=ATOL)
    loss, grads = train_step(ours, inputs)
    ref_loss, ref_grads = train_step(plain, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=ATOL)
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=GRAD_ATOL, msg=name)


def test_no_mask_and_no_repeated_keys_are_saved_when_nothing_is_padded(pair):
    ours, plain = pair
    ours.train(), plain.train()
    inputs = batch(False)
    saved = saved_for_backward(lambda: ours(**inputs).loss)
    ref = saved_for_backward(lambda: plain(**inputs).loss)
    # the reference saves each layer's float copy of the mask (`where`) and repeat_kv's copies
    # of the keys and values (`clone`, this LLaMA has 2 key/value heads for 4 query heads)
    assert ref.by_op["where"] == 2 * (2 * 1 * 12 * 12 * 4) and "where" not in saved.by_op
    assert ref.by_op["clone"] - saved.by_op["clone"] == 2 * 2 * (2 * 4 * 12 * 16 * 4)
    assert saved.total < ref.total
    padded = batch(True)  # with padding the mask is real: both save it
    assert saved_for_backward(lambda: ours(**padded).loss).by_op["where"] == ref.by_op["where"]


def test_attention_dropout_still_follows_train_and_eval():
    model = LLAMA.build()
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    cm = compiled(model, skip=True)
    node = nodes(cm, attention)[0]
    assert node.meta[MODE_KEY].train == 0.5 and node.meta[MODE_KEY].eval == 0.0
    inputs = batch(False)
    cm.eval()
    with torch.no_grad():
        assert torch.equal(cm(**inputs).logits, cm(**inputs).logits)  # eval: no dropout
    cm.train()
    with torch.no_grad():
        assert not torch.equal(cm(**inputs).logits, cm(**inputs).logits)  # train: dropout in attention


def test_mask_unless_causal_keeps_every_mask_that_is_not_the_lower_triangle():
    causal = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5)
    assert mask_unless_causal(causal) is None
    padded = causal.clone()
    padded[1, :, :, 0] = False
    assert mask_unless_causal(padded) is padded
    bidirectional = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    assert mask_unless_causal(bidirectional) is bidirectional
    with_cache = torch.ones(2, 1, 5, 8, dtype=torch.bool).tril()  # keys beyond the queries (a KV cache)
    assert mask_unless_causal(with_cache) is with_cache
    additive = torch.zeros(5, 5).masked_fill(~causal[0, 0], float("-inf"))
    assert mask_unless_causal(additive) is additive


def test_a_model_without_a_boolean_attention_mask_is_left_alone():
    family = FAMILIES["convnet"]
    cm = peftc.compile(family.build(), {"adapters": [{"method": "lora", "targets": ["conv1"], "r": 2}]},
                       example_inputs=family.example_inputs())
    record = next(r for r in cm.records if r.name == PASS)
    assert not record.modified and record.nodes_before == record.nodes_after

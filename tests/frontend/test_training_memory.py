"""A LoRA training step holds no more memory than HF PEFT's, without and with gradient checkpointing
(peak live tensor bytes of forward + backward, and bytes saved for backward, by peftc.inspect.memory)."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES, randomize_adapters
from peft_reference import peft_lora

import peftc
from peftc.inspect.memory import peak_live_bytes, saved_for_backward

LLAMA = FAMILIES["llama"]
TARGETS = list(LLAMA.all_linear)


def contenders(checkpointing: bool):
    model = LLAMA.build()
    cm = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": TARGETS, "r": 4,
                                                           "alpha": 8}]})
    randomize_adapters(cm)  # non-zero B: gradients reach every adapter, in both
    ref = peft_lora(copy.deepcopy(model), cm, TARGETS, r=4, alpha=8)
    if checkpointing:
        cm.gradient_checkpointing_enable()
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return cm.train(), ref.train()


def rotary_rows_bytes(model, inputs) -> int:
    """Bytes of the rotary cos/sin tables for every row but the first.

    A call without position_ids runs the graph derived from the superset capture, which holds
    position_ids of one row per example (peftc.capture.input_defaults): the rotary tables come out
    [batch, seq, head_dim] where the model's own default ([1, seq]) gives one row. That is the one
    difference from PEFT's step, computed once for all layers (the layers read the tables by reference)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch, seq = inputs["input_ids"].shape
    return (batch - 1) * seq * head_dim * 2 * torch.float32.itemsize  # cos and sin


def step_peak(model, inputs) -> tuple[int, torch.Tensor]:
    """(peak bytes of forward + backward, the loss)."""
    losses = []

    def step():
        losses.append(model(**inputs).loss)
        losses[-1].backward()
    step()  # the graph for this call signature, built before measuring
    model.zero_grad(set_to_none=True)
    peak = peak_live_bytes(step).peak
    model.zero_grad(set_to_none=True)
    return peak, losses[-1].detach()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_peak_is_at_most_pefts(checkpointing):
    cm, ref = contenders(checkpointing)
    inputs = LLAMA.inputs(2, 32)
    inputs["labels"] = inputs["input_ids"]
    ours, loss = step_peak(cm, inputs)
    theirs, ref_loss = step_peak(ref, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)  # the same step
    allowance = rotary_rows_bytes(cm, inputs)
    assert ours <= theirs + allowance, f"peftc peak {ours} B > PEFT's {theirs} B + {allowance} B of rotary rows"


def test_peftc_saves_no_more_for_backward_than_peft():
    cm, ref = contenders(False)
    inputs = LLAMA.inputs(2, 32)
    inputs["labels"] = inputs["input_ids"]
    for model in (cm, ref):  # the graph for this call signature is built before measuring
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
    ours = saved_for_backward(lambda: cm(**inputs).loss)
    theirs = saved_for_backward(lambda: ref(**inputs).loss)
    assert ours.total <= theirs.total + rotary_rows_bytes(cm, inputs), (ours.top(), theirs.top())
    # what it saves differently: the logits where PEFT saves the log-probabilities, no repeated keys
    assert "_log_softmax" in theirs.by_op and "_log_softmax" not in ours.by_op

"""bf16 autocast (Trainer's `bf16=True`, accelerate's mixed precision) on a compiled model: PEFT's numbers.

The graph is captured in float32; under an ambient autocast its ATen ops dispatch through autocast
as the original module's do, so the compiled model computes in the same dtypes as PEFT's eager model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainingArguments

import peftc
from families import FAMILIES, randomize_adapters
from peft_reference import peft_lora

R, ALPHA = 4, 8
BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def pair(name, targets=None):
    family = FAMILIES[name]
    model = family.build()
    targets = targets or family.targets
    cm = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": list(targets),
                                                            "r": R, "alpha": ALPHA}]})
    randomize_adapters(cm)
    return family, cm, peft_lora(model, cm, targets, R, ALPHA)


def causal_rows(n=8, seq=10):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 128, (seq,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 4] = -100
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def gradients(model, ids, labels, autocast: bool):
    model.eval().zero_grad()  # no dropout: the two models draw masks differently
    with torch.autocast(**BF16, enabled=autocast):
        out = model(input_ids=ids, labels=labels)
        logits = model(input_ids=ids).logits  # the signature without labels, derived from the one with
    out.loss.backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return out.loss.detach(), (out.logits.detach(), logits.detach()), flat


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_autocast_forward_and_backward_match_peft(name):
    family, cm, reference = pair(name)
    ids = family.inputs(2, 6)["input_ids"]
    labels = torch.tensor([0, 2]) if name == "bert" else ids
    loss, logits, ours = gradients(cm, ids, labels, autocast=True)
    ref_loss, ref_logits, theirs = gradients(reference, ids, labels, autocast=True)
    _, _, exact = gradients(reference, ids, labels, autocast=False)
    # the same values in the same dtype, with labels and without: bfloat16 logits (the lm_head / classifier
    # matmul's dtype under autocast), the loss float32 (transformers' loss upcasts its own copy of the logits)
    for got, want in zip(logits, ref_logits):
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want)
    assert loss.dtype == ref_loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    # bf16 rounds each product to 8 bits (2^-8 ~ 0.4%): the gradients differ from float32 by ~1% in both
    # models. BERT's backward differs in kernel, not dtype (eager drops an all-ones mask, the graph keeps
    # it: another SDPA kernel), so the bound is PEFT's own distance from the float32 gradients.
    ours_error = float((ours - exact).norm() / exact.norm())
    peft_error = float((theirs - exact).norm() / exact.norm())
    assert 0 < ours_error <= 1.5 * peft_error + 1e-4, (ours_error, peft_error)
    if name == "llama":  # the same kernels throughout: the same bits
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def bf16_losses(model, out):
    args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, bf16=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=causal_rows())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_trainer_bf16_losses_equal_peft(name, tmp_path):
    _, cm, reference = pair(name, ("q_proj", "k_proj", "v_proj"))  # three shrinks of one input: packed
    ours = bf16_losses(cm, tmp_path / "peftc")
    theirs = bf16_losses(reference, tmp_path / "peft")
    assert len(ours) == 3
    assert ours == pytest.approx(theirs, abs=1e-4)


class _Head(torch.nn.Module):
    """A head whose loss upcasts its own copy of the logits, as transformers' ForCausalLMLoss does; with
    `upcast`, the model itself returns float32 logits (a model's own `return logits.float()`)."""

    def __init__(self, upcast: bool):
        super().__init__()
        self.lin, self.upcast = torch.nn.Linear(8, 4), upcast

    def loss_function(self, logits, labels):
        return (logits.float() - labels).pow(2).mean()

    def forward(self, x, labels):
        logits = self.lin(x)
        logits = logits.float() if self.upcast else logits
        return {"loss": self.loss_function(logits, labels), "logits": logits}


@pytest.mark.parametrize("upcast", [False, True], ids=["loss_casts", "model_casts"])
def test_the_loss_functions_cast_is_not_the_models_output(upcast):
    """Under autocast the logits come back in the dtype the original returns: bfloat16 when only the loss
    upcasts (export traced its no-op cast as the output), float32 when the model's own code does."""
    from peftc.capture.export import capture

    model = _Head(upcast)
    x, labels = torch.randn(3, 8), torch.randn(3, 4)
    gm = capture(model, (x, labels), {})
    with torch.autocast(**BF16):
        got, want = gm(x, labels), model(x, labels)
    assert got["logits"].dtype == want["logits"].dtype == (torch.float32 if upcast else torch.bfloat16)
    assert got["loss"].dtype == want["loss"].dtype == torch.float32
    torch.testing.assert_close(got["loss"], want["loss"])

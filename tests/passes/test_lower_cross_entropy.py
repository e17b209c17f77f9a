"""lower_cross_entropy: peftc::cross_entropy equals aten's loss and gradient (every reduction, ignored
rows), the pass lowers a causal LM's loss with equal training and a smaller peak, and leaves other forms."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, randomize_adapters
from plan_steps import without_steps

import peftc
from peftc.inspect.memory import peak_live_bytes
from peftc.ir.cross_entropy import REDUCTIONS, cross_entropy
from peftc.passes.lower_cross_entropy import LEAN_OP, PASS, lower_cross_entropy

aten = torch.ops.aten
LLAMA = FAMILIES["llama"]


def logits_and_targets(ignored: int = 3):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 7, generator=g, requires_grad=True)
    target = torch.randint(0, 7, (10,), generator=g)
    target[:ignored] = -100
    return logits, target


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_loss_and_gradient_equal_aten(reduction):
    logits, target = logits_and_targets()
    ours = cross_entropy(logits, target, REDUCTIONS[reduction], -100)
    ref = F.cross_entropy(logits, target, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    upstream = torch.rand(ref.shape) + 0.5  # a non-trivial incoming gradient
    grad, = torch.autograd.grad(ours, logits, upstream)
    ref_grad, = torch.autograd.grad(ref, logits, upstream)
    assert grad[:3].abs().max() == 0 and grad[3:].abs().max() > 0  # ignored rows get none
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_every_row_ignored_gives_nan_loss_and_zero_gradient_as_aten():
    logits, target = logits_and_targets(ignored=10)
    ours = cross_entropy(logits, target, REDUCTIONS["mean"], -100)
    ref = F.cross_entropy(logits, target)
    assert ours.isnan() and ref.isnan()
    grad, = torch.autograd.grad(ours, logits)
    ref_grad, = torch.autograd.grad(ref, logits)
    assert torch.equal(grad, torch.zeros_like(logits)) and torch.equal(ref_grad, grad)


def test_backward_holds_one_logits_sized_buffer_where_aten_holds_three():
    logits = torch.randn(64, 1000, requires_grad=True)  # made before: not counted
    target = torch.randint(0, 1000, (64,))
    size = logits.numel() * logits.element_size()
    ours = peak_live_bytes(lambda: cross_entropy(logits, target, REDUCTIONS["mean"], -100).backward()).peak
    logits.grad = None
    theirs = peak_live_bytes(lambda: F.cross_entropy(logits, target).backward()).peak
    assert ours < 1.1 * size and theirs > 2.9 * size


def test_registration_passes_torch_library_opcheck():
    logits, target = logits_and_targets()
    torch.library.opcheck(cross_entropy, (logits, target, REDUCTIONS["mean"], -100))


def compiled(model, lower: bool):
    inputs = LLAMA.inputs(2, 16)
    inputs["labels"] = inputs["input_ids"]

    def build():
        cm = peftc.compile(copy.deepcopy(model), {"adapters": [{"method": "lora", "targets": list(LLAMA.targets),
                                                               "r": 4, "alpha": 8}]}, example_kwargs=inputs)
        randomize_adapters(cm)
        return cm.train()
    if lower:
        return build(), inputs
    with without_steps(PASS):
        return build(), inputs


@pytest.fixture(scope="module")
def pair():
    model = LLAMA.build()
    (ours, inputs), (plain, _) = compiled(model, True), compiled(model, False)
    return ours, plain, inputs


def ops(cm, target) -> int:
    return sum(1 for n in cm.flat_graph_module.graph.nodes if n.target == target)


def test_the_causal_lm_loss_is_lowered(pair):
    ours, plain, _ = pair
    assert ops(plain, aten.cross_entropy_loss.default) == 1 and ops(plain, LEAN_OP) == 0
    assert ops(ours, aten.cross_entropy_loss.default) == 0 and ops(ours, LEAN_OP) == 1


def test_training_equals_the_aten_loss_with_a_smaller_peak(pair):
    ours, plain, inputs = pair
    results = []
    for cm in (ours, plain):
        cm.zero_grad(set_to_none=True)
        holder = {}
        peak = peak_live_bytes(lambda cm=cm, holder=holder: holder.setdefault("loss", cm(**inputs).loss).backward())
        grads = {n: p.grad.clone() for n, p in cm.named_parameters() if p.requires_grad}
        results.append((holder["loss"].detach(), grads, peak.peak))
    (loss, grads, peak), (ref_loss, ref_grads, ref_peak) = results
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert peak < ref_peak  # this model's peak is elsewhere; the op's own saving is measured below


class Smoothed(torch.nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.head = torch.nn.Linear(4, 5)
        self.options = options

    def forward(self, x, y):
        return F.cross_entropy(self.head(x), y, **self.options)


@pytest.mark.parametrize("options", [{"label_smoothing": 0.1}, {"weight": torch.ones(5)}, {}],
                         ids=["label_smoothing", "class_weights", "plain"])
def test_only_the_form_the_op_covers_is_lowered(options):
    module = Smoothed(**options)
    gm = torch.export.export(module, (torch.randn(3, 4), torch.tensor([0, 1, 4]))).module()
    before = sum(1 for n in gm.graph.nodes if n.target == aten.cross_entropy_loss.default)
    result = lower_cross_entropy(gm, None)
    assert before == 1 and result.modified == (not options)
    assert sum(1 for n in gm.graph.nodes if n.target == LEAN_OP) == (0 if options else 1)

"""`peftc::cross_entropy`: the loss of `aten.cross_entropy_loss` with a backward that holds less.

`aten.cross_entropy_loss` is log_softmax then nll_loss: it saves the log-probabilities
([tokens, vocab], the largest activation of a language model) for backward, and its backward
holds three tensors of that size at once: the saved log-probabilities, nll_loss's dense
gradient (zero but at the targets) and log_softmax's gradient. This op saves the logits
instead (alive anyway when the caller keeps the model's output, and the same size when not)
and computes the gradient `(softmax(logits) - onehot(target)) * dloss` into one buffer: two
vocabulary-sized tensors in backward instead of three. Class weights, label smoothing and
probability targets are not covered (the pass leaves those calls alone).
"""

from __future__ import annotations

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # aten's integer codes (torch.nn._reduction)


@torch.library.custom_op("peftc::cross_entropy", mutates_args=())
def cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: int, ignore_index: int) -> torch.Tensor:
    """Cross entropy of [N, C] logits against [N] class indices, as aten.cross_entropy_loss computes it."""
    return torch.ops.aten.cross_entropy_loss.default(logits, target, None, reduction, ignore_index, 0.0)


@cross_entropy.register_fake
def _(logits, target, reduction, ignore_index):
    return logits.new_empty(target.shape if reduction == REDUCTIONS["none"] else ())


def _setup_context(ctx, inputs, output) -> None:
    logits, target, reduction, ignore_index = inputs
    ctx.save_for_backward(logits, target)
    ctx.reduction, ctx.ignore_index = reduction, ignore_index


def _backward(ctx, grad_loss):
    logits, target = ctx.saved_tensors
    return logits_gradient(logits, target, grad_loss, ctx.reduction, ctx.ignore_index), None, None, None


def logits_gradient(logits: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor, reduction: int,
                    ignore_index: int) -> torch.Tensor:
    """d loss / d logits = (softmax(logits) - onehot(target)) * (the loss gradient each row gets)."""
    kept = target != ignore_index
    per_row = grad_loss.to(logits.dtype)
    if reduction == REDUCTIONS["mean"]:
        per_row = per_row / kept.sum().to(logits.dtype)
    # where, not a product: with every target ignored the mean divides by zero, and those rows get 0
    per_row = torch.where(kept, per_row, torch.zeros((), dtype=logits.dtype, device=logits.device)).unsqueeze(1)
    grad = torch.softmax(logits, dim=1)
    grad.mul_(per_row)
    grad.scatter_add_(1, torch.where(kept, target, 0).unsqueeze(1), -per_row)
    return grad


cross_entropy.register_autograd(_backward, setup_context=_setup_context)

"""The user's view of a partitioned call as one autograd op: forward runs the exchanges, backward runs
them in reverse, so `loss.backward()` on the user's side trains its adapters through the base."""

from __future__ import annotations

import torch

from peftc.partitioning.session import UserSession


class RemoteCall(torch.autograd.Function):
    """outputs = base ∘ user(inputs); `anchor` (a leaf that requires grad) makes autograd record the call."""

    @staticmethod
    def forward(ctx, session: UserSession, flat_inputs: list, anchor: torch.Tensor, holder: list):
        ctx.set_materialize_grads(False)  # an output nobody differentiates sends no gradient
        with torch.enable_grad():
            outputs = session.forward(flat_inputs, grad=True)
        ctx.session = session
        ctx.positions = [i for i, value in enumerate(outputs) if isinstance(value, torch.Tensor)]
        ctx.count = len(outputs)
        tensors = tuple(outputs[i].detach() for i in ctx.positions)
        ctx.mark_non_differentiable(*[t for t in tensors if not t.is_floating_point()])
        holder.extend(outputs)  # the non-tensor outputs, and the order to put the tensors back in
        return tensors

    @staticmethod
    def backward(ctx, *grads):
        output_grads: list = [None] * ctx.count
        for position, grad in zip(ctx.positions, grads):
            output_grads[position] = grad
        ctx.session.backward(output_grads)
        return None, None, None, None


def remote_call(session: UserSession, flat_inputs: list) -> list:
    """The call's flat outputs; differentiable (through both programs) when grad mode is on."""
    if not torch.is_grad_enabled():
        return session.forward(flat_inputs, grad=False)
    holder: list = []
    tensors = RemoteCall.apply(session, flat_inputs, torch.zeros((), requires_grad=True), holder)
    tensors = iter(tensors)
    return [next(tensors) if isinstance(value, torch.Tensor) else value for value in holder]

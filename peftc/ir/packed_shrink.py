"""`peftc::packed_shrink(x, [A_1, ..., A_n])`: x @ cat(A_i)^T, saving the A's, not their concatenation.

fuse_lora_shrinks runs the LoRA shrinks of sites that read one input as one matmul. Written as
`linear(x, cat(A_i))`, autograd saves the concatenated weight for backward: a copy of every
fused A per layer that unfused LoRA (and HF PEFT) never holds. This op saves the A's
themselves (parameters, alive anyway) and concatenates them again in backward, where the copy
lives only while that layer's gradient is computed. Results equal cat + linear bit for bit.

Under autocast (Trainer's bf16=True) the linear runs in bfloat16 and backward computes one matmul
per A, as unfused LoRA's autograd does, so the gradients equal PEFT's bit for bit there too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("peftc::packed_shrink", mutates_args=())
def packed_shrink(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """linear(x, cat(weights)): [..., in] x [r_i, in] -> [..., sum r_i]."""
    return F.linear(x, torch.cat(weights, 0))


@packed_shrink.register_fake
def _(x, weights):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


def _setup_context(ctx, inputs, output) -> None:
    x, weights = inputs
    ctx.save_for_backward(x, *weights)


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    x_needs, weights_need = ctx.needs_input_grad
    weights_need = any(weights_need) if isinstance(weights_need, (list, tuple)) else weights_need
    if any(t.dtype != grad.dtype for t in (x, *weights)):  # the forward ran under autocast (backward does not)
        return _backward_per_weight(grad, x, weights, x_needs, weights_need)
    grad_x = grad @ torch.cat(weights, 0) if x_needs else None
    grad_weights = None
    if weights_need:
        packed = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # [sum r_i, in]
        grad_weights = list(packed.split([w.shape[0] for w in weights], 0))
    return grad_x, grad_weights


def _backward_per_weight(grad, x, weights, x_needs, weights_need):
    """The gradients unfused LoRA under autocast gets, bit for bit: one matmul per A in `grad`'s dtype
    (autocast's), each cast back to its input's dtype, the x parts summed there. One packed matmul
    would round the sum over all ranks to bfloat16 once instead: a different gradient from PEFT's."""
    pieces = grad.split([w.shape[0] for w in weights], -1)
    grad_x = None
    if x_needs:
        for piece, w in zip(pieces, weights):
            part = (piece @ w.to(grad.dtype)).to(x.dtype)
            grad_x = part if grad_x is None else grad_x + part
    grad_weights = None
    if weights_need:
        rows = x.reshape(-1, x.shape[-1]).to(grad.dtype)
        grad_weights = [(piece.reshape(-1, piece.shape[-1]).t() @ rows).to(w.dtype) for piece, w in zip(pieces, weights)]
    return grad_x, grad_weights


packed_shrink.register_autograd(_backward, setup_context=_setup_context)


OP = torch.ops.peftc.packed_shrink.default


def inline_packed_shrinks(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with every packed_shrink as the `linear(x, cat(A_i))` it computes, for a graph that never runs
    backward (generate()'s decoding graphs, run under no_grad): what the op saves for backward is moot
    there, and a custom op's Python dispatch costs each decoding step more than its two ATen calls.
    Results equal the op's bit for bit (the op runs the same two calls)."""
    graph = gm.graph
    shrinks = [node for node in graph.nodes if node.op == "call_function" and node.target is OP]
    for node in shrinks:
        x, weights = node.args
        with graph.inserting_before(node):
            packed = graph.call_function(torch.ops.aten.cat.default, (list(weights), 0))
            inlined = graph.call_function(torch.ops.aten.linear.default, (x, packed))
        inlined.meta.update(node.meta)
        node.replace_all_uses_with(inlined)
        graph.erase_node(node)
    if shrinks:
        gm.recompile()
    return gm

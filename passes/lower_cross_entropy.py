"""lower_cross_entropy: aten.cross_entropy_loss becomes peftc::cross_entropy, whose backward holds less.

A language model's loss is its largest activation ([tokens, vocab]). The aten op saves the
log-probabilities and holds three tensors of that size while it runs backward; peftc's op
(peftc.ir.cross_entropy) saves the logits and computes the gradient into one buffer, so the
peak of a training step drops by one [tokens, vocab] tensor. Only the form that op covers is
lowered: [N, C] logits, [N] integer targets, no class weights, no label smoothing.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.ir.cross_entropy import REDUCTIONS
from peftc.ir.graph_edit import PROVENANCE_KEY
from peftc.ir.node_text import node_module_path
from peftc.pipeline.runner import PassContext, PassResult

aten = torch.ops.aten
PASS = "lower_cross_entropy"
LEAN_OP = torch.ops.peftc.cross_entropy.default
# aten::cross_entropy_loss(self, target, weight=None, reduction=Mean, ignore_index=-100, label_smoothing=0.0)
DEFAULTS = (None, None, None, REDUCTIONS["mean"], -100, 0.0)
NAMES = ("self", "target", "weight", "reduction", "ignore_index", "label_smoothing")


def lower_cross_entropy(gm: GraphModule, ctx: PassContext | None) -> PassResult:
    """Replace each cross_entropy_loss over [N, C] logits and [N] class indices by peftc::cross_entropy."""
    result = PassResult(modified=False)
    lowered = 0
    for node in list(gm.graph.nodes):
        call = _lowerable(node)
        if call is None:
            continue
        with gm.graph.inserting_after(node):
            lean = gm.graph.call_function(LEAN_OP, (call["self"], call["target"], call["reduction"],
                                                    call["ignore_index"]))
        lean.meta.update({k: v for k, v in node.meta.items() if k != PROVENANCE_KEY})
        lean.meta[PROVENANCE_KEY] = {"pass": PASS, "site": node_module_path(node)}  # no adapter: no "method"
        node.replace_all_uses_with(lean)
        gm.graph.erase_node(node)
        lowered += 1
    result.modified = lowered > 0
    if lowered:  # a note, not sites: the report's site rows are the weights adapters touch
        result.notes.append(f"{lowered} cross-entropy loss(es) save the logits, not the log-probabilities, "
                            "for backward")
    return result


def _lowerable(node: Node) -> dict | None:
    """The call's arguments by name, if peftc::cross_entropy computes the same thing."""
    if node.op != "call_function" or node.target != aten.cross_entropy_loss.default:
        return None
    call = {name: node.args[i] if i < len(node.args) else node.kwargs.get(name, DEFAULTS[i])
            for i, name in enumerate(NAMES)}
    logits, target = (arg.meta.get("val") if isinstance(arg, Node) else None for arg in (call["self"], call["target"]))
    if not (isinstance(logits, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if logits.dim() != 2 or target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
        return None
    if call["weight"] is not None or call["label_smoothing"] != 0.0 or call["reduction"] not in REDUCTIONS.values():
        return None
    return call

"""skip_causal_masks: attention reads no mask when the mask is only causal (transformers' eager SDPA path).

The captured graph builds a boolean attention mask from the 2-D padding mask and hands it to
every `scaled_dot_product_attention`, which converts it to a float mask and saves that for
backward in each layer. Eager transformers skips the mask when nothing is padded and calls
SDPA with `is_causal=True`. This pass makes the graph do the same: one
`mask_unless_causal(mask)` per mask (None when the mask is exactly causal, checked at run
time), and each attention reading it becomes `causal_attention.attention`, which runs SDPA
causally when it gets None. Where the keys and values come through transformers' `repeat_kv`
(grouped-query attention), the attention reads them before the repeat and repeats them only
when it needs the mask, as eager transformers passes `enable_gqa` to an unmasked SDPA: no
repeated copy of the keys and values is saved per layer. Outputs are unchanged either way.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.ir.causal_attention import attention, mask_unless_causal
from peftc.ir.graph_edit import PROVENANCE_KEY
from peftc.ir.node_text import node_module_path
from peftc.pipeline.runner import PassContext, PassResult

aten = torch.ops.aten
PASS = "skip_causal_masks"
SDPA = aten.scaled_dot_product_attention.default
MASK_INDEX, CAUSAL_INDEX = 3, 5  # positions of attn_mask and is_causal in SDPA's schema
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)
FULL = 2**62  # a slice end at least this large keeps the whole dimension (export writes sys.maxsize)


def skip_causal_masks(gm: GraphModule, ctx: PassContext | None) -> PassResult:
    """Give each SDPA that reads a boolean mask `mask_unless_causal(mask)` instead, and run it causally on None."""
    result = PassResult(modified=False)
    by_mask: dict[Node, list[Node]] = {}
    for node in gm.graph.nodes:
        mask = _boolean_mask(node)
        if mask is not None:
            by_mask.setdefault(mask, []).append(node)
    for mask, readers in by_mask.items():
        checked = _insert_after(gm, mask, mask_unless_causal, (mask,), {}, mask.meta)
        for sdpa in readers:
            _replace_attention(gm, sdpa, mask, checked)
    result.modified = bool(by_mask)
    if by_mask:  # notes, not sites: the report's site rows are the weights adapters touch
        result.notes.append(f"{sum(map(len, by_mask.values()))} attention ops skip their mask at run time "
                            "when it is exactly causal (SDPA is_causal, as eager transformers)")
    return result


def _boolean_mask(node: Node) -> Node | None:
    """The boolean mask node an SDPA call reads, if it reads one and is not causal already."""
    if node.op != "call_function" or node.target != SDPA:
        return None
    mask, causal = _arg(node, MASK_INDEX, "attn_mask"), _arg(node, CAUSAL_INDEX, "is_causal")
    if not isinstance(mask, Node) or causal:
        return None
    val = mask.meta.get("val")
    return mask if isinstance(val, torch.Tensor) and val.dtype == torch.bool else None


def _replace_attention(gm: GraphModule, sdpa: Node, mask: Node, checked: Node) -> None:
    """The same call, to `attention`, reading the checked mask (and the keys/values before repeat_kv);
    the node's metadata (train/eval dropout, module stack, shape) carries over, since the arguments
    keep their places."""
    args, kwargs = list(sdpa.args), dict(sdpa.kwargs)
    if len(args) > MASK_INDEX:
        args[MASK_INDEX] = checked
    else:
        kwargs["attn_mask"] = checked
    repeated = [_repeated_kv(node) for node in args[1:3]]
    dead = []
    if all(repeated) and len({n for _, n in repeated}) == 1 and not kwargs.get("enable_gqa"):
        dead = args[1:3]
        args[1:3] = [source for source, _ in repeated]
        kwargs["kv_repeats"] = repeated[0][1]
    new = _insert_after(gm, sdpa, attention, tuple(args), kwargs, sdpa.meta)
    sdpa.replace_all_uses_with(new)
    gm.graph.erase_node(sdpa)
    for node in dead:
        _erase_unused_chain(gm, node)


def _repeated_kv(node) -> tuple[Node, int] | None:
    """(X, n) if `node` is transformers' repeat_kv(X, n): reshape(expand(X[:, :, None]), [b, kv * n, s, d])."""
    if not isinstance(node, Node) or node.target not in RESHAPES or not isinstance(node.args[0], Node):
        return None
    expand = node.args[0]
    if expand.target != aten.expand.default or len(expand.args[1]) != 5 or not isinstance(expand.args[1][2], int):
        return None
    source, unsqueezed = expand.args[0], False
    while isinstance(source, Node) and (_is_full_slice(source) or _is_unsqueeze_2(source) and not unsqueezed):
        unsqueezed |= source.target == aten.unsqueeze.default
        source = source.args[0]
    before, after = (n.meta.get("val") if isinstance(n, Node) else None for n in (source, node))
    if not unsqueezed or not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return None
    repeats = expand.args[1][2]
    if before.dim() != 4 or after.dim() != 4 or before.shape[1] * repeats != after.shape[1] or repeats < 2:
        return None
    return source, repeats


def _is_full_slice(node: Node) -> bool:
    if node.target != aten.slice.Tensor:
        return False
    # aten::slice.Tensor(self, dim=0, start=None, end=None, step=1)
    start, end, step = (_arg(node, i, name) for i, name in ((2, "start"), (3, "end"), (4, "step")))
    return start in (0, None) and (end is None or isinstance(end, int) and end >= FULL) and step in (1, None)


def _is_unsqueeze_2(node: Node) -> bool:
    return node.target == aten.unsqueeze.default and node.args[1] == 2


def _erase_unused_chain(gm: GraphModule, node: Node) -> None:
    """Erase `node` and the view ops feeding it that nothing else reads (the bypassed repeat_kv)."""
    while isinstance(node, Node) and not node.users and node.op == "call_function" and (
            node.target in RESHAPES or node.target == aten.expand.default or _is_full_slice(node)
            or _is_unsqueeze_2(node)):
        source = node.args[0]
        gm.graph.erase_node(node)
        node = source


def _insert_after(gm: GraphModule, anchor: Node, fn, args: tuple, kwargs: dict, meta: dict) -> Node:
    with gm.graph.inserting_after(anchor):
        node = gm.graph.call_function(fn, args, kwargs)
    node.meta.update({k: v for k, v in meta.items() if k != PROVENANCE_KEY})
    # no "method": these nodes are no adapter (merge_and_unload refuses graphs holding adapter nodes)
    node.meta[PROVENANCE_KEY] = {"pass": PASS, "site": node_module_path(anchor)}
    return node


def _arg(node: Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


"""lower_prefix_multi: give each served row its prefix adapter's keys and values at every attention op."""

from __future__ import annotations

import torch
from peftc.passes.add_routing_input import routing_input
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.lora_bank import ServingPlan
from peftc.ir.virtual_bank import PrefixBank
from peftc.pipeline.runner import PassContext, PassResult

from ._attention import attention_ops, head_layout, sdpa_arg, set_sdpa_arg
from ._virtual_rows import row_lengths, visible_slots

aten = torch.ops.aten
SLOT = "prefix_multi"
SLIDING_PREFIX_REFUSED = ("served prefix adapters on a model with sliding-window layers: PEFT's prefix falls out of "
                          "the window for late queries, which the served prefix does not model yet (the compiled one "
                          "does); serve the prefix adapter's own model, peftc.from_peft(model, folder)")  # peftc.<attention path>.prefix_multi.{key, value, lengths, slots}


def lower_prefix_multi(gm: GraphModule, ctx: PassContext) -> PassResult:
    """keys = [bank[id] | keys] per row, its padding slots masked; the row's token positions shifted by its N."""
    plan: ServingPlan = ctx.serving
    if not plan.prefix_paths:
        return PassResult(modified=False)
    found = attention_ops(gm)
    unknown = sorted(plan.prefix_paths - {path for _, path in found})
    if unknown:
        raise SpecError(f"a served prefix adapter names attention op {unknown[0]!r}, which this model does not "
                        f"have (it has {[p for _, p in found][:3]}...); was it trained on another model?")
    if any(window is not None for window in ctx.shared.attention_windows):
        raise SpecError(SLIDING_PREFIX_REFUSED)
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    if "position_ids" not in placeholders:
        raise ValueError("lower_prefix_multi: the graph has no position_ids input; served calls pass them "
                         "(peftc.serving.virtual_inputs)")
    seq_ids = routing_input(gm)
    like = next(iter(ctx.base_params.values()))
    result = PassResult(modified=True)
    for node, path in found:
        if path not in plan.prefix_paths:
            continue
        bank, created = adapters.get_or_create(ctx.adapter_root, path, SLOT,
                                               lambda path=path: PrefixBank(path, list(plan.adapters), like))
        _rewrite_attention(gm, node, path, bank.key.shape[2], seq_ids)
        result.sites.append(path)
        if created:
            for name in ("key", "value"):
                result.params_added[f"{path}.{SLOT}.{name}"] = getattr(bank, name).numel()
    _shift_positions(gm, placeholders["position_ids"], result.sites[0], seq_ids)
    names = [a.name for a in plan.adapters if plan.prefix_paths & set(a.sites)]
    result.notes.append(f"prefixes of {', '.join(names)} at {len(result.sites)} attention ops")
    return result


def _rewrite_attention(gm: GraphModule, node: Node, path: str, width: int, seq_ids: Node) -> None:
    tag = {"pass": "lower_prefix_multi", "method": "prefix", "site": path, "slot": SLOT, "entry": None}
    _, _, groups, _ = head_layout(node)
    ins = Inserter(gm, node.prev, tag)
    for index, name in ((1, "key"), (2, "value")):
        rows = ins.call(aten.index.Tensor, ins.get_attr(adapters.target(path, SLOT, name)), [seq_ids])
        set_sdpa_arg(node, index, ins.call(aten.cat.default, [_repeat_heads(ins, rows, groups), sdpa_arg(node, index)], 2))
    visible, _ = visible_slots(ins, path, SLOT, row_lengths(ins, path, SLOT, seq_ids), width)
    set_sdpa_arg(node, 3, _widened_mask(ins, node, visible, width))
    set_sdpa_arg(node, 5, False)  # the widened mask says what is_causal said, prefix columns included


def _repeat_heads(ins: Inserter, rows: Node, groups: int) -> Node:
    """[batch, kv, N, d] -> [batch, kv * groups, N, d], each kv head repeated as repeat_kv does."""
    if groups == 1:
        return rows
    _, kv, n, d = rows.meta["val"].shape
    wide = ins.call(aten.expand.default, ins.call(aten.unsqueeze.default, rows, 2), [-1, kv, groups, n, d])
    return ins.call(aten.reshape.default, wide, [-1, kv * groups, n, d])


def _widened_mask(ins: Inserter, node: Node, visible: Node, width: int) -> Node:
    """The attention mask [batch, heads, q, width + k]: each row's visible prefix slots, then its old mask."""
    query, key, mask = sdpa_arg(node, 0), sdpa_arg(node, 1), sdpa_arg(node, 3)
    batch = ins.call(aten.sym_size.int, query, 0)
    q_len = ins.call(aten.sym_size.int, query, 2)
    if mask is None:
        k_len = ins.call(aten.sym_size.int, key, 2)
        mask = ins.call(aten.new_ones.default, query, [q_len, k_len], dtype=torch.bool)
        if sdpa_arg(node, 5, False):
            mask = ins.call(aten.tril.default, mask)
        mask = ins.call(aten.unsqueeze.default, ins.call(aten.unsqueeze.default, mask, 0), 0)
    val = mask.meta["val"]
    heads = ins.call(aten.sym_size.int, mask, 1)
    mask = ins.call(aten.expand.default, mask, [batch, -1, q_len, -1])
    columns = ins.call(aten.expand.default, ins.call(aten.unsqueeze.default, ins.call(
        aten.unsqueeze.default, visible, 1), 1), [batch, heads, q_len, width])
    if val.dtype != torch.bool:  # an additive mask: 0 where visible, the dtype's lowest value elsewhere
        hidden = ins.call(aten.logical_not.default, columns)
        columns = ins.call(aten.mul.Tensor, ins.call(aten._to_copy.default, hidden, dtype=val.dtype),
                           torch.finfo(val.dtype).min)
    return ins.call(aten.cat.default, [columns, mask], -1)


def _shift_positions(gm: GraphModule, positions: Node, path: str, seq_ids: Node) -> None:
    """position_ids + N per row: the row's tokens follow its N prefix slots, as its own model places them."""
    users = [u for u in positions.users if u.op == "call_function"]
    ins = Inserter(gm, seq_ids, {"pass": "lower_prefix_multi", "method": "prefix", "site": path, "slot": SLOT,
                                 "entry": None})
    lengths = ins.call(aten.unsqueeze.default, row_lengths(ins, path, SLOT, seq_ids), 1)
    redirect_users(users, positions, ins.call(aten.add.Tensor, positions, lengths))

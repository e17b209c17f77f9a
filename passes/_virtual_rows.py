"""Per-row graph values the virtual-token passes share: each row's own N and its visible slots."""

from __future__ import annotations

import torch
from torch.fx import Node

from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter

aten = torch.ops.aten


def row_lengths(ins: Inserter, path: str, slot: str, seq_ids: Node) -> Node:
    """lengths[id] [batch]: each row's own number of virtual tokens (0 for the base)."""
    return ins.call(aten.index.Tensor, ins.get_attr(adapters.target(path, slot, "lengths")), [seq_ids])


def visible_slots(ins: Inserter, path: str, slot: str, lengths: Node, width: int) -> tuple[Node, Node]:
    """(visible [batch, width] bool, offset [batch, width] int64): a row's own N tokens fill the last N of
    the width slots; `offset` is a slot's index among them (negative for the padding before them)."""
    slots = ins.get_attr(adapters.target(path, slot, "slots"))
    start = ins.call(aten.unsqueeze.default, ins.call(aten.rsub.Scalar, lengths, width), 1)
    offset = ins.call(aten.sub.Tensor, ins.call(aten.unsqueeze.default, slots, 0), start)
    return ins.call(aten.ge.Scalar, offset, 0), offset


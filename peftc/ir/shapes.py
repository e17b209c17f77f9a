"""Readable tensor shapes: the sizes of the example inputs, with the dims that vary marked.

Capture exports batch and sequence dims as dynamic, so `meta["val"]` holds SymInts (`s72`).
Each backed SymInt carries the size it had in the example inputs (its hint); that number is
what a user wants to read, marked so that it is not taken for a fixed size: `[2*,8*,64]`.
A dim with no example size (an unbacked `u0`, a graph without a ShapeEnv) shows its symbol.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

DYNAMIC_MARK = "*"
LEGEND = f"{DYNAMIC_MARK} = dynamic dim (varies with the input; the number is its size in the example inputs)"


@dataclass(frozen=True)
class Shape:
    """A tensor shape as captured: one size per dim, and the indices of the dynamic dims."""

    sizes: tuple  # ints; a dynamic dim with no example size is its symbol's text ('u0')
    dynamic: tuple[int, ...] = ()

    @classmethod
    def of(cls, value) -> "Shape | None":
        """The shape of a (fake) tensor, or None for anything else."""
        if not isinstance(value, torch.Tensor):
            return None
        sizes, dynamic = [], []
        for index, dim in enumerate(value.shape):
            size, is_dynamic = example_size(dim)
            sizes.append(size)
            if is_dynamic:
                dynamic.append(index)
        return cls(tuple(sizes), tuple(dynamic))

    def __str__(self) -> str:
        return "[" + ",".join(f"{size}{DYNAMIC_MARK if i in self.dynamic else ''}"
                              for i, size in enumerate(self.sizes)) + "]"

    def to_dict(self) -> dict:
        """JSON: `sizes` (ints, the example sizes of dynamic dims) and `dynamic` (their indices)."""
        return {"sizes": list(self.sizes), "dynamic": list(self.dynamic)}


def example_size(dim) -> tuple[int | str, bool]:
    """(size, is_dynamic) of one dim: an int stays; a SymInt gives its example size, or its text."""
    if isinstance(dim, int):
        return dim, False
    try:
        constant = dim.node.maybe_as_int()  # a SymInt that export specialized to one value
        if constant is not None:
            return constant, False
        return int(guarding_hint_or_throw(dim)), True  # reads the hint; adds no guard
    except Exception:  # noqa: BLE001 — no example size known (unbacked, no ShapeEnv): show the symbol
        return _symbol_text(dim), True


def _symbol_text(dim) -> str:
    try:
        return str(dim)
    except Exception:  # noqa: BLE001 — printing a SymInt needs its ShapeEnv; a shape never fails a report
        return "?"


def node_shape(node: Node) -> Shape | None:
    """The shape of a node's output, from its `meta["val"]`; None if it is not a tensor."""
    return Shape.of(node.meta.get("val"))


def has_dynamic(shapes) -> bool:
    """Whether any of `shapes` (Shape or None) has a dynamic dim: then a legend is worth a line."""
    return any(shape is not None and shape.dynamic for shape in shapes)

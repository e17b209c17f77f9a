"""Size bounds torch.export infers from the 0/1 assumption, not from the model: relaxed after export.

Export traces every dynamic size as at least 2 (its 0/1 specialization) and refines the range of a
size from the guards the trace adds. Where a guard relates sizes (transformers' padding mask:
`past + new <= attention_mask.size(1)`), the refined lower bound counts each size at 2, and the
unlifted module checks it (`attention_mask.size()[1] >= 4`): a prompt of one token with no past,
which the original and the guard's own relation accept, fails. Every guard the trace added is
checked as written (`ExportedProgram._guards_code`, single-size guards included), so a lower bound
above 2 says nothing those checks do not, except when the caller declared it (`Dim("n", min=4)`):
then nothing is relaxed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils._sympy.value_ranges import ValueRanges

TRACED_MIN = 2  # export's lower bound for a dynamic size it was told nothing about


def relax_inferred_bounds(program: torch.export.ExportedProgram, dynamic_shapes: Any) -> None:
    """Lower each range bound above 2 back to 2 (no check) unless `dynamic_shapes` declares a minimum above 2."""
    if _declared_min(dynamic_shapes) > TRACED_MIN:
        return
    program._range_constraints = {  # no setter: export builds the module's input checks from this dict
        symbol: ValueRanges(TRACED_MIN, bounds.upper) if _above_traced_min(bounds) else bounds
        for symbol, bounds in program.range_constraints.items()
    }


def _above_traced_min(bounds: ValueRanges) -> bool:
    return bounds.lower.is_number and int(bounds.lower) > TRACED_MIN


def _declared_min(dynamic_shapes: Any) -> int:
    """The largest minimum a Dim in `dynamic_shapes` declares (Dim.AUTO and Dim.DYNAMIC hints included)."""
    mins = [getattr(leaf, "min", None) for leaf in tree_leaves(dynamic_shapes, is_leaf=_is_dim)]
    return max((m for m in mins if isinstance(m, int)), default=0)


def _is_dim(value: Any) -> bool:
    return hasattr(value, "min") and hasattr(value, "max")

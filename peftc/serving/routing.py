"""Per-row adapter ids: what a served model's caller passes, checked and turned into bank indices.

    ids = adapter_index(["sql", None, 0, "__base__"], names=["sql", "chat"], batch=4)  # tensor([0, -1, 0, -1])

Each row names an adapter, gives its index, or picks the base alone (None, "__base__", -1).
Anything else is a SpecError naming the row and the id: an unknown or empty name, a bool
(True is not adapter 1), an index out of range (checked before any int64 conversion, so 2**63
is an error, not an overflow), a float or 2-D tensor, or a count that is not the batch size.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from peftc.errors import SpecError

BASE_NAMES = (None, "__base__")  # ids meaning the base alone (PEFT's mixed batches name it "__base__")
BASE_INDEX = -1


def check_adapter_names(adapters_by_name, caller: str, values: str) -> None:
    """The names a multi-adapter model is built with: at least one, each a non-empty string that is
    not a base id. `values` says what the mapping's values are, for the message."""
    if not adapters_by_name:
        raise SpecError(f"{caller}: no adapters given; pass {{name: {values}, ...}}")
    for name in adapters_by_name:
        if not isinstance(name, str) or not name or name in BASE_NAMES:
            raise SpecError(f"{caller}: adapter name {name!r} is not usable; use a non-empty string "
                            f"other than {BASE_NAMES[1]!r}")


def adapter_index(adapter_ids: Any, names: Sequence[str], batch: int) -> torch.Tensor:
    """The ids as bank indices (int64 [batch], -1 for the base), with errors naming the id and the fix."""
    if adapter_ids is None:
        raise SpecError(f"adapter_ids: missing; pass one per batch row, names from {list(names)} "
                        "or None for the base alone, e.g. adapter_ids=[...]")
    if isinstance(adapter_ids, torch.Tensor):
        ids = _from_tensor(adapter_ids, names)
    else:
        ids = torch.tensor([_index_of(value, row, names) for row, value in enumerate(_as_list(adapter_ids))],
                           dtype=torch.long)
    if ids.numel() != batch:
        raise SpecError(f"adapter_ids: {ids.numel()} ids for a batch of {batch}; pass one id per batch row "
                        "(sequence)")
    return ids


def _from_tensor(ids: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dim() != 1:
        raise SpecError(f"adapter_ids: expected a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    ids = ids.long()
    bad = ((ids < BASE_INDEX) | (ids >= len(names))).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise SpecError(f"adapter_ids[{row}]: {int(ids[row])} is out of range; {_valid(names)}")
    return ids


def _index_of(value: Any, row: int, names: Sequence[str]) -> int:
    if value is None or (isinstance(value, str) and value == BASE_NAMES[1]):
        return BASE_INDEX
    if isinstance(value, bool):  # before int: bool is an int subclass
        raise SpecError(f"adapter_ids[{row}]: {value!r} is a bool, not an adapter; {_valid(names)}")
    if isinstance(value, int) or (hasattr(value, "__index__") and not isinstance(value, str)):
        value = value.__index__()  # numpy and 0-d tensor integers too
        if not BASE_INDEX <= value < len(names):
            raise SpecError(f"adapter_ids[{row}]: {value} is out of range; {_valid(names)}")
        return value
    if isinstance(value, str):
        if value not in names:
            raise SpecError(f"adapter_ids[{row}]: unknown adapter {value!r}; served adapters are {list(names)} "
                            "(None or '__base__' for the base alone)")
        return list(names).index(value)
    raise SpecError(f"adapter_ids[{row}]: {value!r} ({type(value).__name__}) is not an adapter id; {_valid(names)}")


def _valid(names: Sequence[str]) -> str:
    return (f"ids are 0..{len(names) - 1} ({', '.join(names)}), their names, or -1 / None / '__base__' "
            "for the base alone")


def _as_list(value: Any) -> Sequence:
    return [value] if isinstance(value, (str, int)) or value is None else list(value)

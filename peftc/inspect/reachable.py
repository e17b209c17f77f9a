"""Bytes of tensor storage an object keeps alive: every storage reachable from it by references.

    reachable_storage_bytes(cm)          # the compiled model, its compilation, graphs, hooks...

Memory a process holds for a model is what the garbage collector can reach from it, not only
what `parameters()` lists: a graph, a cached copy or a capture source that still references a
full weight keeps it alive after FSDP2 replaced the module's parameter with a shard. The walk
follows every container and object (`gc.get_referents`) and the cells of closures, but not
classes, modules or functions' globals (shared by the whole program). A storage counts once,
a DTensor counts its local shard, and meta or fake tensors count nothing.
"""

from __future__ import annotations

import gc
import types

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.tensor import DTensor

_NOT_FOLLOWED = (type, types.ModuleType, types.CodeType, types.FrameType, types.BuiltinFunctionType)


def reachable_storages(*roots) -> dict[tuple, int]:
    """(device, data pointer) -> bytes, for each distinct storage reachable from `roots`."""
    seen: set[int] = set()
    found: dict[tuple, int] = {}
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _NOT_FOLLOWED):
            continue
        seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            stack.extend(_cell_contents(obj.__closure__ or ()))
            continue
        if isinstance(obj, torch.Tensor):
            _record(obj.to_local() if isinstance(obj, DTensor) else obj, found)
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            if isinstance(obj, DTensor):
                continue
        stack.extend(gc.get_referents(obj))
    return found


def reachable_storage_bytes(*roots) -> int:
    return sum(reachable_storages(*roots).values())


def _record(tensor: torch.Tensor, found: dict[tuple, int]) -> None:
    if tensor.is_meta or isinstance(tensor, FakeTensor):
        return
    storage = tensor.untyped_storage()
    if storage.data_ptr() != 0:
        found[(str(tensor.device), storage.data_ptr())] = storage.nbytes()


def _cell_contents(cells) -> list:
    """What a closure's cells hold (a cell whose variable is not bound yet holds nothing)."""
    out = []
    for cell in cells:
        try:
            out.append(cell.cell_contents)
        except ValueError:
            continue
    return out

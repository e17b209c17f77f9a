"""How much memory a training step holds: bytes saved for backward, and peak live tensor bytes.

    saved = saved_for_backward(lambda: model(**batch).loss)   # SavedBytes: total, and by the op that made it
    peak = peak_live_bytes(step)                              # LiveBytes: peak, and what was alive then

Both count storages, not tensors: views of one buffer (a transpose, a split) are one buffer, and
a tensor two backward nodes save is counted once. They run on any device, CPU included, so
they measure what a step allocates where `torch.cuda.max_memory_allocated` cannot. Run the
step once before measuring: a compiled model captures a new call signature's graph on its
first call, and torch.export cannot trace under the dispatch mode these counters use.
Saved bytes come from autograd's saved-tensor hooks, which activation checkpointing replaces
inside each checkpointed layer: with checkpointing, read the peak.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class SavedBytes:
    total: int  # bytes of the distinct storages autograd saved that the forward itself allocated
    by_op: Counter = field(default_factory=Counter)  # op that allocated each saved storage ("silu") -> bytes

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        return self.by_op.most_common(n)


@dataclass
class LiveBytes:
    peak: int  # the most bytes of storages the step had allocated and not yet freed, at once
    at_peak: Counter = field(default_factory=Counter)  # op that allocated each storage alive at the peak -> bytes

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        return self.at_peak.most_common(n)


def saved_for_backward(forward: Callable[[], torch.Tensor]) -> SavedBytes:
    """Run `forward` (returns a loss), count the storages autograd saves for backward, then run the backward.

    Only storages `forward`'s own ops allocate count: a weight or an input saved by reference
    (a frozen base weight an op reads, its transpose) existed before and is not an activation.
    """
    tracker = _Storages()
    saved: dict[int, int] = {}
    by_op: Counter = Counter()

    def pack(tensor):
        made = tracker.made_by(tensor)
        if made is not None and made[0] not in saved:
            key, nbytes, op = made
            saved[key] = nbytes
            by_op[op] += nbytes
        return tensor

    with tracker, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return SavedBytes(sum(saved.values()), by_op)


def peak_live_bytes(step: Callable[[], object]) -> LiveBytes:
    """Run `step` and track every storage its ops allocate until it is freed; the peak of their sum.

    Storages that existed before the step (parameters, optimizer state, the batch) are not counted.
    """
    tracker = _Storages()
    with tracker:
        step()
    return LiveBytes(tracker.peak, tracker.at_peak)


class _Storages(TorchDispatchMode):
    """Sees every op's inputs and outputs. A storage first seen as an input existed before; one first
    seen as an output was allocated by that op, and counts as live until its last reference dies.

    Weak references hold each storage's bookkeeping object, so a freed storage's address is never
    reused for a new one while it is tracked (its `cdata` stays unique).
    """

    def __init__(self):
        super().__init__()
        self.before: dict[int, StorageWeakRef] = {}
        self.live: dict[int, tuple[StorageWeakRef, int, str]] = {}  # cdata -> (ref, bytes, op that allocated it)
        self.peak = 0
        self.at_peak: Counter = Counter()

    def made_by(self, tensor: torch.Tensor) -> tuple[int, int, str] | None:
        """(storage key, bytes, op) if a tracked op allocated `tensor`'s storage and it is alive."""
        entry = self.live.get(StorageWeakRef(tensor.untyped_storage()).cdata)
        return None if entry is None else (StorageWeakRef(tensor.untyped_storage()).cdata, entry[1], entry[2])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in _tensors((args, kwargs)):
            key = StorageWeakRef(tensor.untyped_storage()).cdata
            if key not in self.live and key not in self.before:
                self.before[key] = StorageWeakRef(tensor.untyped_storage())
        out = func(*args, **kwargs)
        for tensor in _tensors(out):
            ref = StorageWeakRef(tensor.untyped_storage())
            if ref.cdata not in self.live and ref.cdata not in self.before:
                self.live[ref.cdata] = (ref, tensor.untyped_storage().nbytes(), func.overloadpacket.__name__)
        for key in [k for k, (ref, _, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        current = sum(nbytes for _, nbytes, _ in self.live.values())
        if current > self.peak:
            self.peak = current
            self.at_peak = Counter()
            for _, nbytes, op in self.live.values():
                self.at_peak[op] += nbytes
        return out


def _tensors(tree) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]

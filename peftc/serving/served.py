"""peftc.serve_adapters: one base model, many LoRA adapters, each batch row picks its own.

    mm = peftc.serve_adapters(model, {"sql": "adapters/sql", "chat": cm_chat})
    out = mm(input_ids=ids, adapter_ids=["sql", "chat", None])   # None / -1: the base alone

The model is captured once; the lower_lora_multi pass replaces every linear site some adapter
targets by peftc::lora_multi over per-site banks of all adapters (S-LoRA / Punica style):
BGMV kernels when each sequence has one token at the site (decode), SGMV over runs of equal ids
when it has several (prefill). Triton on CUDA, the torch implementation elsewhere.

How the ids reach the graph: the wrapper stores them per call in a buffer (peftc.routing.seq_ids)
that the graph reads. The trade-off: the graph keeps the model's own call signature (HF keyword
inputs, dynamic batch and sequence, one graph per signature as for CompiledModel) without
rewriting torch.export's input spec; the price is state: one call at a time per served model
(not re-entrant across threads), and a graph exported from it would see the ids as a constant.
An extra graph input would be functional, at the cost of editing the captured module's pytree
input spec.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from peftc.capture.example_inputs import example_call
from peftc.compiler.compilation import Compilation
from peftc.errors import SpecError
from peftc.ir.lora_bank import LoraBank, ServingPlan
from peftc.passes.lower_lora_multi import ROUTING, SLOT
from peftc.runtime.dispatch import GraphDispatch
from peftc.serving.sources import load_adapter

BACKENDS = ("triton",)
BASE_NAMES = (None, "__base__")  # ids meaning the base alone (PEFT's mixed batches name it "__base__")


class Routing(nn.Module):
    """Holds the current call's per-sequence adapter ids (int64 [batch]); empty between calls."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.register_buffer("seq_ids", torch.empty(0, dtype=torch.long, device=device), persistent=False)

    def set(self, ids: torch.Tensor) -> None:
        self.seq_ids = ids

    def clear(self) -> None:
        self.seq_ids = self.seq_ids.new_empty(0)


def serve_adapters(model: nn.Module, adapters_by_name: Mapping[str, Any], *, backend: str = "triton",
                   example_inputs: Any = None, example_kwargs: dict | None = None) -> "ServedModel":
    """A module running `model` with any of `adapters_by_name` per batch row.

    Values: a CompiledModel, a folder written by `cm.save_adapter(dir)`, or a PEFT adapter folder;
    each must be LoRA alone on linear layers. Ranks, alphas and targets may differ per adapter.
    The model itself is not changed (its parameters keep their requires_grad flags).
    """
    if backend not in BACKENDS:
        raise SpecError(f"backend: expected one of {list(BACKENDS)} (Triton kernels on CUDA, their torch "
                        f"implementation elsewhere), got {backend!r}")
    if not adapters_by_name:
        raise SpecError("serve_adapters: no adapters given; pass {name: adapter_dir_or_CompiledModel, ...}")
    for name in adapters_by_name:
        if not isinstance(name, str) or name in BASE_NAMES:
            raise SpecError(f"serve_adapters: adapter name {name!r} is not usable; use a non-empty string "
                            f"other than {BASE_NAMES[1]!r}")
    loaded = tuple(load_adapter(name, source, model) for name, source in adapters_by_name.items())
    example = example_call(model, example_inputs, example_kwargs)
    compilation = Compilation.start(model, None)
    compilation.adapter_root.add_module(ROUTING, Routing(_device(model)))
    plan = compilation.serve_plan(ServingPlan(loaded))
    built = compilation.build(*example, plan)
    return ServedModel(compilation, plan, built, example, training=model.training)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class ServedModel(GraphDispatch):
    """`serve_adapters`' result: call it as the model, plus `adapter_ids` (one per batch row)."""

    def __init__(self, compilation, plan, first, example, *, training):
        super().__init__(compilation, plan, first, example, training=training)
        self.adapter_names = [a.name for a in plan.serving.adapters]
        object.__setattr__(self, "_routing", compilation.adapter_root.get_submodule(ROUTING))

    def forward(self, *args, adapter_ids: Any = None, **kwargs):
        batch = _batch_size(args, kwargs)
        ids = self.adapter_index(adapter_ids, batch)
        self._routing.set(ids.to(self._routing.seq_ids.device))
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._routing.clear()

    def adapter_index(self, adapter_ids: Any, batch: int) -> torch.Tensor:
        """The ids as bank indices (int64 [batch], -1 for the base), with errors naming the fix."""
        if adapter_ids is None:
            raise SpecError(f"adapter_ids: missing; pass one per batch row, names from {self.adapter_names} "
                            "or None for the base alone, e.g. adapter_ids=[...]")
        if isinstance(adapter_ids, torch.Tensor):
            if adapter_ids.dtype.is_floating_point or adapter_ids.dim() != 1:
                raise SpecError(f"adapter_ids: expected a 1-D integer tensor, got {adapter_ids.dtype} "
                                f"of shape {tuple(adapter_ids.shape)}")
            ids = adapter_ids.long()
        else:
            ids = torch.tensor([self._index_of(i) for i in _as_list(adapter_ids)], dtype=torch.long)
        if ids.numel() != batch:
            raise SpecError(f"adapter_ids: {ids.numel()} ids for a batch of {batch}; pass one id per batch row "
                            "(sequence)")
        bad = ids[(ids < -1) | (ids >= len(self.adapter_names))]
        if bad.numel():
            raise SpecError(f"adapter_ids: {int(bad[0])} is out of range; ids are 0..{len(self.adapter_names) - 1} "
                            f"({', '.join(self.adapter_names)}) or -1 for the base alone")
        return ids

    def _index_of(self, value: Any) -> int:
        if value in BASE_NAMES:
            return -1
        if isinstance(value, int):
            return value
        if value not in self.adapter_names:
            raise SpecError(f"adapter_ids: unknown adapter {value!r}; served adapters are {self.adapter_names} "
                            "(None or '__base__' for the base alone)")
        return self.adapter_names.index(value)

    def banks(self) -> dict[str, LoraBank]:
        """The LoRA bank of every served site, by site path."""
        return {name[: -len(SLOT) - 1]: m for name, m in self.compilation.adapter_root.named_modules()
                if isinstance(m, LoraBank)}

    def __repr__(self) -> str:  # the graph modules' own repr would list every layer
        banks = self.banks()
        ranks = sorted({bank.A_bank.shape[1] for bank in banks.values()})
        return (f"ServedModel({type(self.compilation.source).__name__}, adapters={len(self.adapter_names)} {self.adapter_names}, "
                f"sites={len(banks)}, bank ranks={ranks})")


def _as_list(value: Any) -> Sequence:
    return [value] if isinstance(value, (str, int)) or value is None else list(value)


def _batch_size(args: tuple, kwargs: dict) -> int:
    """The leading dim of the first tensor argument: the batch the ids index."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise SpecError("adapter_ids: no tensor argument to read the batch size from")

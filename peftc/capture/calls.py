"""Calls: what a graph is specialized on (its call signature), and how a call is normalized.

torch.export specializes a graph on which arguments a call passes and what kinds they are;
`CallSignature` is that key. `normalize_call` applies peftc's defaults to a call before it is
matched or captured.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class CallSignature:
    """What a graph is specialized on: argument positions and names, which are tensors, constants."""

    args: tuple
    kwargs: tuple

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> CallSignature:
        return cls(
            args=tuple(_kind(a) for a in args),
            kwargs=tuple(sorted((k, _kind(v)) for k, v in kwargs.items())),
        )

    def describe(self) -> str:
        parts = [f"arg{i}:{k}" for i, k in enumerate(self.args)]
        parts += [f"{name}={k}" for name, k in self.kwargs]
        return "(" + ", ".join(parts) + ")"


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor[{value.dim()}d,{value.dtype}]".replace("torch.", "")
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ",".join(_kind(v) for v in value) + ")"
    return repr(value)


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "main_input_name")


def forward_parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def normalize_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """HF models: default `use_cache=False`, since a KV cache is not a training input or output."""
    if is_hf_model(model) and "use_cache" in forward_parameters(model) and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return args, kwargs

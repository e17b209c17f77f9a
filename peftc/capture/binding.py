"""Bind a call to the original forward's signature, in the one form graphs are keyed by.

A call is bound to the model's `forward` signature first, so an argument the original does
not accept raises the same TypeError before anything is captured. transformers models' calls
are then put in canonical form — every argument by keyword, arguments equal to their default
dropped — so `m(ids)`, `m(input_ids=ids)` and `m(input_ids=ids, attention_mask=None)` are one
call signature and reach one graph.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftc.capture.calls import is_hf_model


def forward_signature(model: nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def bind_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`args`/`kwargs` checked against the original forward (its TypeError if they do not fit), and for
    transformers models in canonical keyword form."""
    signature = forward_signature(model)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{type(model).__name__}.forward() {err}") from None
    if not is_hf_model(model):
        return args, kwargs
    return (), _canonical_kwargs(signature, bound)


def _canonical_kwargs(signature: inspect.Signature, bound: inspect.BoundArguments) -> dict:
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"forward(*{name}) cannot be compiled: pass those arguments by keyword")
        elif not _is_default(value, param.default):
            out[name] = value
    return out


def _is_default(value: Any, default: Any) -> bool:
    if value is None:
        return default is None or default is inspect.Parameter.empty
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    return default is not inspect.Parameter.empty and type(value) is type(default) and value == default

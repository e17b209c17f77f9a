"""The compiled model's call contract: the original forward's signature, its arguments, its errors.

A call is bound to the original `forward`'s signature first, so an argument the original
does not accept raises the same TypeError, before anything is captured. transformers models'
calls are then put in one canonical form — every argument by keyword, arguments equal to their
default dropped — so `cm(ids)`, `cm(input_ids=ids)` and `cm(input_ids=ids, attention_mask=None)`
reach the same graph; `return_dict` is applied to the graph's output instead of specializing
a graph on it.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from peftc.capture.export import is_hf_model

OUTPUT_FLAGS = ("return_dict",)  # applied to the output, never captured


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


def split_output_flags(kwargs: dict) -> tuple[dict, dict]:
    """(kwargs for the graph, output flags applied afterwards)."""
    flags = {k: kwargs[k] for k in OUTPUT_FLAGS if k in kwargs}
    return {k: v for k, v in kwargs.items() if k not in flags}, flags


def apply_output_flags(output: Any, flags: dict) -> Any:
    """`return_dict=False`: the ModelOutput as the tuple the original returns."""
    if flags.get("return_dict") is False and hasattr(output, "to_tuple"):
        return output.to_tuple()
    return output


def signed_forward(module: nn.Module, model: nn.Module):
    """`module.forward` bound, carrying the original's signature (what Trainer and accelerate inspect)."""
    forward = functools.partial(type(module).forward, module)
    forward.__signature__ = forward_signature(model)
    forward.__doc__ = getattr(model.forward, "__doc__", None)
    return forward


def original_error(model: nn.Module, args: tuple, kwargs: dict) -> BaseException | None:
    """The exception the original model raises for this call, if any (used when capture fails:
    an argument the original refuses should fail as the original fails, not as an export error)."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as err:  # whatever the original raises is what the user should see
        return err
    return None

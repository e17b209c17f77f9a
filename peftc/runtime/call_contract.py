"""The compiled model's call contract, past binding (peftc.capture.binding): output flags, the
signature tools inspect (the original's errors for refused calls: peftc.runtime.call_errors).

`return_dict` is applied to the graph's output instead of specializing a graph on it.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from peftc.capture.binding import forward_signature

OUTPUT_FLAGS = ("return_dict",)  # applied to the output, never captured


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

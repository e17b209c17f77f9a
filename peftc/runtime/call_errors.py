"""Call-time errors are the original model's: never a torch.export guard or a capture error.

A compiled graph refuses some calls the eager model would judge differently: a new call
signature (float ids, 1-D ids) fails to capture, and a graph's shape guards
(`attention_mask.size()[1] == input_ids.size()[1]`) fail as AssertionErrors. When that happens
the original model runs on the same inputs (eval mode, no grad, its modes and flags put back)
to reproduce its own error, which is raised instead. If the original accepts the call, a
guard failure becomes a `CallError` naming the argument and the condition the graph needs;
any other failure is raised as it was. The success path pays nothing: this runs only after
a graph call has already failed.
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

import torch
from torch import nn

from peftc.capture.calls import forward_parameters
from peftc.errors import CallError, CaptureError
from peftc.runtime.user_model import kept_unchanged

GUARD = re.compile(r"Guard failed: (?P<condition>.+)")
ARGUMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CACHE_TENSORS = {"past_keys": "keys", "past_values": "values"}  # a cached graph's inputs (runtime.forward_cache)
REPRODUCED = (CaptureError, AssertionError, RuntimeError, ValueError, TypeError, IndexError)


def call_error(model: nn.Module, args: tuple, kwargs: dict, err: Exception) -> Exception:
    """The exception to raise for a call whose graph failed with `err`."""
    if not isinstance(err, REPRODUCED) or isinstance(err, torch.OutOfMemoryError):
        return err
    original = original_error(model, args, kwargs)
    if original is not None:
        return original
    guard = GUARD.search(str(err))
    if guard is not None:
        condition = guard["condition"].strip()
        return CallError(f"{_argument_named(model, condition)}: the compiled graph needs {condition}"
                         f"{_graph_inputs_named(condition)} for this call, and this call breaks it (the original "
                         "model accepts it); pass inputs of the shapes it was compiled with, or recompile with "
                         "example inputs like this call")
    return err


def _argument_named(model: nn.Module, condition: str) -> str:
    """The first of the model's own arguments a guard reads (a cached graph's also reads the cache's tensors)."""
    names = ARGUMENT.findall(condition)
    own = [name for name in names if name in forward_parameters(model)]
    return (own or names or ["arguments"])[0]


def _graph_inputs_named(condition: str) -> str:
    """What the cached graphs' own inputs in a guard are (peftc.runtime.forward_cache passes them)."""
    named = [f"{name}[i]: layer i's {what} in the cache passed" for name, what in CACHE_TENSORS.items()
             if f"{name}[" in condition]
    return f" ({'; '.join(named)})" if named else ""


def original_error(model: nn.Module, args: tuple, kwargs: dict) -> Exception | None:
    """What the original model raises for this call (run in eval, without grad), or None if it runs.
    A KV cache passed runs as a copy: the original would extend the caller's."""
    kwargs = {name: _copied_cache(value) if _is_cache(value) else value for name, value in kwargs.items()}
    with kept_unchanged(model), torch.no_grad():
        model.eval()
        try:
            model(*args, **kwargs)
        except Exception as err:  # whatever the model raises is what the user expects to see
            return err
    return None


def raise_call_error(model: nn.Module, args: tuple, kwargs: dict, err: Exception) -> Any:
    """Raise `call_error(...)`: the original's error replaces the graph's, which stays as its context."""
    error = call_error(model, args, kwargs, err)
    if error is err:
        raise err
    raise error from err


def _is_cache(value: Any) -> bool:
    """A transformers Cache (only where transformers is loaded: this module does not import it)."""
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _copied_cache(cache: Any) -> Any:
    """A copy of a cache's layers and their tensors (detached: deepcopy refuses tensors with a history)."""
    copied = copy.copy(cache)
    copied.layers = [_with_copied_tensors(layer) for layer in cache.layers]
    return copied


def _with_copied_tensors(layer: Any) -> Any:
    copied = copy.copy(layer)
    for name, value in vars(layer).items():
        if isinstance(value, torch.Tensor):
            setattr(copied, name, value.detach().clone())
    return copied

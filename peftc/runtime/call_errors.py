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

import re
from typing import Any

import torch
from torch import nn

from peftc.errors import CallError, CaptureError
from peftc.runtime.user_model import kept_unchanged

GUARD = re.compile(r"Guard failed: (?P<condition>.+)")
ARGUMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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
        name = ARGUMENT.match(condition)
        return CallError(f"{name[0] if name else 'arguments'}: the compiled graph needs {condition} for this "
                         "call, and this call breaks it (the original model accepts it); pass inputs of the "
                         "shapes it was compiled with, or recompile with example inputs like this call")
    return err


def original_error(model: nn.Module, args: tuple, kwargs: dict) -> Exception | None:
    """What the original model raises for this call (run in eval, without grad), or None if it runs."""
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

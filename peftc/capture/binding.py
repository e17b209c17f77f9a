"""Bind a call to the original forward's signature, in the one form graphs are keyed by.

A call is bound to the model's `forward` signature first, so an argument the original does
not accept raises the same TypeError before anything is captured. transformers models' calls
are then put in canonical form — every argument by keyword, arguments equal to their default
dropped — so `m(ids)`, `m(input_ids=ids)` and `m(input_ids=ids, attention_mask=None)` are one
call signature and reach one graph; so do calls with and without an all-ones attention mask, and
calls passing an output flag (`output_hidden_states=False`) equal to the config's.
"""

from __future__ import annotations

import functools
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
    kwargs = _without_config_flags(model, _canonical_kwargs(signature, bound))
    return (), _with_full_mask(signature, _with_float_count(kwargs))


def canonical_call(signature: inspect.Signature, args: tuple, kwargs: dict, what: str) -> dict:
    """A call of a function with `signature` in canonical keyword form (as bind_call puts forward calls),
    or the TypeError the function raises for it."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{what} {err}") from None
    return _canonical_kwargs(signature, bound)


RECORDING_FLAGS = ("output_hidden_states", "output_attentions")  # default: the config's value


def _without_config_flags(model: nn.Module, kwargs: dict) -> dict:
    """transformers reads an absent output flag as the config's; passing that value is the same call."""
    same = [flag for flag in RECORDING_FLAGS
            if isinstance(kwargs.get(flag), bool) and kwargs[flag] == getattr(model.config, flag, None)]
    return {k: v for k, v in kwargs.items() if k not in same}


ITEM_COUNT = "num_items_in_batch"
COUNT_DTYPE = torch.float32  # what transformers' Trainer passes: the count divided by the parallel sizes


def _with_float_count(kwargs: dict) -> dict:
    """`num_items_in_batch` as an integer tensor (a training loop's `labels.ne(-100).sum()`) is the float32 count
    Trainer passes: transformers' losses divide a float32 loss by it, which converts an integer count to
    float32 anyway, so both are one call signature and reach one graph."""
    count = kwargs.get(ITEM_COUNT)
    if isinstance(count, torch.Tensor) and count.dim() == 0 and not count.is_floating_point() \
            and not count.is_complex() and count.dtype != torch.bool:
        return {**kwargs, ITEM_COUNT: count.to(COUNT_DTYPE)}
    return kwargs


def _with_full_mask(signature: inspect.Signature, kwargs: dict) -> dict:
    """transformers reads a missing attention_mask as all ones; passing those ones keeps calls with
    and without a mask on one graph (for input_ids [batch, seq], or inputs_embeds [batch, seq, dim])."""
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if "attention_mask" not in signature.parameters or "attention_mask" in kwargs:
        return kwargs
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return {**kwargs, "attention_mask": torch.ones_like(ids)}
    if ids is None and isinstance(embeds, torch.Tensor) and embeds.dim() == 3:
        return {**kwargs, "attention_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)}
    return kwargs


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


def stand_in_for(module: nn.Module, model: nn.Module, signature: inspect.Signature) -> None:
    """Make `module` (whose forward calls `module._model`) stand for `model` in a capture: `model`'s
    children and direct parameters registered as its own, so parameter names, module paths and
    sites are the model's, and its forward carrying `signature` (what export keys kwargs by)."""
    for name, child in model.named_children():
        module.add_module(name, child)
    for name, param in model.named_parameters(recurse=False):
        module.register_parameter(name, param)
    object.__setattr__(module, "_model", model)  # called, not registered: its children are ours
    forward = functools.partial(type(module).forward, module)
    forward.__signature__ = signature
    module.__dict__["forward"] = forward


# A weight view's note of the model it views (peftc.runtime.user_model): its id, which pickles and copies (a
# weak reference would not), compared only among the views one call made (peftc.capture.captured's shared stores).
VIEW_OF = "_peftc_view_of"


def viewed_model_id(view: nn.Module) -> int | None:
    """The id of the model `view` (a weight view) was made from; None for any other module."""
    return view.__dict__.get(VIEW_OF)


def stood_for(module: nn.Module) -> tuple[nn.Module, tuple[type, ...]]:
    """The model `module` stands for (through any wrappers made by `stand_in_for`), and the wrappers' types,
    outermost first: a capture traced through a wrapper made per build is the wrapped model's."""
    wrappers = []
    while isinstance(module.__dict__.get("_model"), nn.Module):
        wrappers.append(type(module))
        module = module.__dict__["_model"]
    return module, tuple(wrappers)


class NamedKeywords(nn.Module):
    """`model` with the arguments a call passes through its `**kwargs` (Trainer's `num_items_in_batch`)
    as named keyword parameters, which torch.export needs to key their dynamic shapes.

    The model's children are registered as this module's own, so parameter names, module paths
    and sites are those of the model itself.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        signature = forward_signature(model)
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
        stand_in_for(self, model, signature.replace(parameters=params))

    def forward(self, *args, **kwargs):
        return self._model(*args, **kwargs)


def with_named_keywords(model: nn.Module, kwargs: dict) -> nn.Module:
    """`model`, or a NamedKeywords view of it when `kwargs` holds names only its `**kwargs` takes."""
    params = forward_signature(model).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    extra = [name for name in kwargs if name not in params]
    return NamedKeywords(model, extra) if takes_any and extra else model

"""Model methods and submodules that run the network, run through compiled graphs with the adapters.

The compiled model forwards the attributes it lacks to the user's model (peftc.runtime.facade);
for a method that runs the network (CLIP's `get_text_features`) or a submodule a tool calls
(TRL's fused LM head calls `model.base_model(...)` for the hidden states) that would run it
*without* the adapters. These calls are instead captured as modules of their own (`MethodCall`)
through the compiled model's own compilation and plan: same passes, same sites, the same adapter
parameters as forward. One graph per method and call signature, built on the first call.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace

from torch import nn

from peftc.capture.binding import canonical_call
from peftc.capture.binding import stand_in_for
from peftc.capture.calls import CallSignature
from peftc.ir.modes import set_mode

COMPILED_METHODS = ("get_text_features", "get_image_features", "get_audio_features", "get_video_features")
COMPILED_SUBMODULES = ("base_model",)  # cm.base_model(...) runs the backbone with the adapters
GRAPHS = "_method_graphs"  # the dispatch's cache: {(method, signature, placement): graph}; never pickled


class MethodCall(nn.Module):
    """`model.<method>(...)` (a method, or a submodule called) as a module's forward. The model's children and parameters are registered
    as this module's own, so parameter names and module paths are the model's (the spec's sites)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.method = method
        stand_in_for(self, model, inspect.signature(getattr(model, method)))

    def forward(self, *args, **kwargs):
        return getattr(self._model, self.method)(*args, **kwargs)


def compiled_method(dispatch, method: str):
    """`dispatch.<method>`: the method of the user's model, run through a graph with the adapters."""
    source = dispatch.compilation.source

    @functools.wraps(getattr(source, method))
    def run(*args, **kwargs):
        kwargs = canonical_call(inspect.signature(getattr(source, method)), args, kwargs, f"{method}()")
        first = next(source.parameters())
        key = (method, CallSignature.of((), kwargs), (first.device, first.dtype))
        graphs = dispatch.__dict__.setdefault(GRAPHS, {})
        if key not in graphs:
            compilation = replace(dispatch.compilation, source=MethodCall(source, method))
            graphs[key] = compilation.build((), kwargs, dispatch.plan).graph_module
        set_mode(graphs[key], dispatch.training)  # a no-op unless the mode changed since the last call
        return graphs[key](**kwargs)

    return run


class CompiledSubmodule:
    """A submodule of the user's model (`cm.base_model`) whose calls run through a compiled graph with
    the adapters; every other attribute (`.layers`, `.config`) is the submodule's own."""

    def __init__(self, dispatch, name: str):
        self._module = getattr(dispatch.compilation.source, name)
        self._run = compiled_method(dispatch, name)

    def __call__(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["_module"], name)

    def __repr__(self) -> str:
        return f"CompiledSubmodule({type(self._module).__name__})"

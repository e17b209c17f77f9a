"""Captures kept for reuse: a later build of a call already captured copies the graph instead of exporting.

One compilation builds several graphs from the same call: the training graph at compile time,
then `merged()`, `merge_and_unload()` and `export_onnx` (other plans over the same superset call),
and a deep copy rebuilding its graphs. torch.export gives the same graph for the same model and
call each time, so each capture is kept as it came out of torch.export (before any pass) and a later
build of an equal call gets a copy: the same nodes, node metadata, input specs, hooks and
guards, over its own module hierarchy (passes set tensors on the graph's modules: a merged
weight must not reach another graph), whose tensors are the model's own at that moment, looked
up by name as torch.export binds them.

A kept capture holds no weights, only where they go ("meta" stand-ins): it keeps no model's
memory alive and serves a deep copy of the model, whose weights are other tensors of the same
names. Where the model no longer has a tensor of that name, shape, dtype and device (a `.to()`
changed them: the graph bakes in dtypes and devices), the call is captured again.
"""

from __future__ import annotations

import copy
import hashlib
import types
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule
from torch.utils import _pytree as pytree

from peftc.capture.binding import stood_for, viewed_model_id

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


@dataclass(frozen=True)
class _Kept:
    model: weakref.ref  # the model captured (a compilation's other sources, a method's wrapper, are others)
    wrappers: tuple[type, ...]  # the stand-ins it was traced through (peftc.capture.binding.stood_for), made per build
    call: tuple  # call_fingerprint of the (args, kwargs) captured: no tensor of the call is held
    template: GraphModule  # the capture, with "meta" stand-ins for the model's tensors
    model_tensors: dict[str, tuple[torch.Size, torch.dtype, torch.device]]  # the names the model supplies


class CapturedGraphs:
    """The graphs a compilation captured, each for reuse by a later build of an equal call.

    Not pickled (graph modules hold generated code pickle cannot store): an unpickled model
    captures again. A deep copy shares the kept captures, which the copy's weights then fill.
    """

    def __init__(self, across_views: bool = False):
        self._kept: list[_Kept] = []
        # Whether weight views of one model share captures: for compilations made together from one model
        # (train_adapters' per-adapter compiles), which nothing can change between their captures.
        self.across_views = across_views

    def reuse(self, model: nn.Module, args: tuple, kwargs: dict) -> GraphModule | None:
        """A copy of the capture of an equal call, reading `model`'s tensors; None if there is none."""
        inner, wrappers = stood_for(model)
        for kept in self._kept:  # a call captured again after a dtype change has two: the one that fits
            if self._same_model(kept, inner) and kept.wrappers == wrappers \
                    and kept.call == call_fingerprint((args, kwargs)):
                gm = _instance(kept, model)
                if gm is not None:
                    return gm
        return None

    def keep(self, model: nn.Module, args: tuple, kwargs: dict, gm: GraphModule) -> None:
        """Keep `gm`, just captured from `model` for (args, kwargs), before any pass changes it."""
        own = _named_tensors(model)
        supplied = {name: t for name, t in _named_tensors(gm).items() if own.get(name) is t}
        stand_ins = {name: _meta_like(t) for name, t in supplied.items()}
        template = copy_graph_module(gm, stand_ins)
        meta = {name: (t.shape, t.dtype, t.device) for name, t in supplied.items()}
        self._kept = [kept for kept in self._kept if kept.model() is not None]  # a method's wrapper, gone
        inner, wrappers = stood_for(model)
        fingerprint = call_fingerprint((args, kwargs))
        if fingerprint is not None:
            self._kept.append(_Kept(weakref.ref(inner), wrappers, fingerprint, template, meta))

    def _same_model(self, kept: _Kept, model: nn.Module) -> bool:
        captured = kept.model()
        if captured is model:
            return True
        viewed = viewed_model_id(model) if self.across_views else None  # a shared store: views of one call's model
        return viewed is not None and captured is not None and viewed_model_id(captured) == viewed

    def __len__(self) -> int:
        return len(self._kept)

    def __getstate__(self):
        return {"_kept": [], "across_views": self.across_views}

    def __deepcopy__(self, memo: dict) -> CapturedGraphs:
        """The kept captures (they hold no tensors) for the copy of each model, where it was copied first (a
        Compilation's `source` comes before its `captured`); the copy's weights fill them when reused."""
        shared = CapturedGraphs()
        for kept in self._kept:
            model_copy = memo.get(id(kept.model()))
            if model_copy is not None:
                shared._kept.append(replace(kept, model=weakref.ref(model_copy)))
        return shared


def same_call(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two (args, kwargs) calls are equal: same structure, constants, and tensors (metadata and values)."""
    first = call_fingerprint(a)
    return first is not None and first == call_fingerprint(b)


def call_fingerprint(call: tuple[tuple, dict]) -> tuple | None:
    """What `same_call` compares, without holding the call's tensors (a digest of each one's bytes), or None
    for a call that cannot be compared (a tensor without data, on the meta device)."""
    leaves, spec = pytree.tree_flatten(call)
    prints = tuple(_leaf_print(leaf) for leaf in leaves)
    return None if any(p is None for p in prints) else (spec, prints)


def _leaf_print(leaf: Any) -> Any:
    if not isinstance(leaf, torch.Tensor):
        return (type(leaf), leaf)
    if leaf.device.type == "meta":
        return None
    data = leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return (type(leaf), leaf.shape, leaf.dtype, leaf.device, hashlib.sha256(data).digest())


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    stand_in = torch.empty_like(tensor, device="meta")
    return nn.Parameter(stand_in, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else stand_in


def _instance(kept: _Kept, model: nn.Module) -> GraphModule | None:
    """The kept capture over `model`'s tensors, or None if `model` lacks one of them as captured."""
    own = _named_tensors(model)
    tensors = {}
    for name, (shape, dtype, device) in kept.model_tensors.items():
        tensor = own.get(name)
        if tensor is None or tensor.shape != shape or tensor.dtype != dtype or tensor.device != device:
            return None
        tensors[name] = tensor
    return copy_graph_module(kept.template, tensors)


def copy_graph_module(gm: GraphModule, tensors: dict[str, torch.Tensor]) -> GraphModule:
    """`gm` with its own graph and module hierarchy (the same classes, hooks and attributes), the
    tensors named in `tensors` replaced by those, every other tensor shared."""
    clone = type(gm).__new__(type(gm))  # GraphModule.__new__ makes each instance its own class
    _copy_module_state(gm, clone, {id(gm): clone})
    clone.meta = dict(gm.meta)
    for name, tensor in tensors.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = clone.get_submodule(owner_path)
        slots = owner._parameters if leaf in owner._parameters else owner._buffers
        slots[leaf] = tensor
    clone.graph = _graph_copy(gm.graph)  # recompiles
    return clone


def _graph_copy(graph: Graph) -> Graph:
    """New nodes (their meta shallow-copied) with the same names, the same output and input specs.
    (Graph.__deepcopy__ would deep-copy the pytree specs too, which torch warns about.)"""
    copied = Graph(tracer_cls=graph._tracer_cls)
    output_value, output = copied.graph_copy(graph, {}, return_output_node=True)
    copied.output(output_value, type_expr=getattr(output, "type", None)).meta = copy.copy(output.meta)
    copied._codegen = copy.copy(graph._codegen)  # its pytree_info is an immutable tuple
    return copied


def _copy_module_state(source: nn.Module, clone: nn.Module, modules: dict[int, nn.Module]) -> None:
    """Fill `clone` (a bare instance of `source`'s class) with `source`'s state, its children copied in turn."""
    clone.__dict__.update(source.__dict__)
    for name, value in source.__dict__.items():  # export's train()/eval() stand-ins are bound to the module
        if isinstance(value, types.MethodType) and value.__self__ is source:
            clone.__dict__[name] = types.MethodType(value.__func__, clone)
    clone._parameters = dict(source._parameters)
    clone._buffers = dict(source._buffers)
    clone._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    for name in HOOK_DICTS:
        if name in source.__dict__:
            clone.__dict__[name] = copy.copy(source.__dict__[name])
    clone._modules = {name: _module_copy(child, modules) for name, child in source._modules.items()}


def _module_copy(module: nn.Module | None, modules: dict[int, nn.Module]) -> nn.Module | None:
    """A copy of a child module of a captured graph; a module at two paths stays one module."""
    if module is None:
        return None
    if id(module) not in modules:
        if isinstance(module, GraphModule):  # a higher-order op's body, export's guards: a graph of their own
            modules[id(module)] = copy_graph_module(module, {})
        else:
            clone = type(module).__new__(type(module))
            modules[id(module)] = clone
            _copy_module_state(module, clone, modules)
    return modules[id(module)]


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named

"""CompiledModel: the rewritten graph(s), used like the original nn.Module.

torch.export specializes a graph on which arguments a call passes (labels or not, a mask
or not). A CompiledModel keeps one graph per call signature: the one captured at compile
time, and others captured on first use of a new signature by the same pipeline, sharing
the same base weights and the same adapter parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.ir import adapters
from peftc.capture.export import CallSignature, normalize_call
from peftc.ir.modes import set_mode
from peftc.runtime.call_errors import raise_call_error


class GraphDispatch(nn.Module):
    """An nn.Module that runs the graph captured for each call's signature."""

    def __init__(self, model: nn.Module, first: GraphModule, signature: CallSignature,
                 build: Callable[[tuple, dict], GraphModule], training: bool = False):
        super().__init__()
        self.training = training
        self.graph_module = first
        object.__setattr__(self, "_model", model)  # the user's model, not a submodule of ours
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_graphs", {signature: first})
        set_mode(first, self.training)

    @property
    def graphs(self) -> dict[CallSignature, GraphModule]:
        return dict(self._graphs)

    def forward(self, *args, **kwargs):
        args, kwargs = normalize_call(self._model, args, kwargs)
        signature = CallSignature.of(args, kwargs)
        try:
            return self._graph_for(signature, args, kwargs)(*args, **kwargs)
        except Exception as err:  # a guard or capture failure: raise what the original model raises
            raise_call_error(self._model, args, kwargs, err)

    def _graph_for(self, signature: CallSignature, args: tuple, kwargs: dict) -> GraphModule:
        gm = self._graphs.get(signature)
        if gm is None:
            gm = self._build(args, kwargs)
            set_mode(gm, self.training)
            self._graphs[signature] = gm
        return gm

    def train(self, mode: bool = True):
        # Exported graph modules refuse .train(); the mode lives in the graph's nodes instead.
        self.training = mode
        for gm in self._graphs.values():
            set_mode(gm, mode)
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for gm in self._graphs.values():
            if gm is not self.graph_module:
                gm._apply(fn, recurse)
        return self


class CompiledModel(GraphDispatch):
    """The result of `peftc.compile`: trains and evaluates like the original model."""

    def __init__(self, model, first, signature, build, *, training, spec, records, sites, adapter_root,
                 merge_build):
        super().__init__(model, first, signature, build, training=training)
        self.spec = spec
        self.records = records
        self.sites = sites
        object.__setattr__(self, "_adapter_root", adapter_root)
        object.__setattr__(self, "_merge_build", merge_build)

    # -- adapter weights ---------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what the spec trains: adapter tensors by adapter name, unfrozen base params by FQN."""
        out = {name: t.detach() for name, t in self._adapter_root.state_dict(keep_vars=True).items()}
        for name, param in self.graph_module.named_parameters(remove_duplicate=False):
            if param.requires_grad and not name.startswith(adapters.ROOT + "."):
                if name in out:
                    raise RuntimeError(f"adapter name {name!r} collides with a base parameter name")
                out[name] = param.detach()
        return out

    def save_adapter(self, directory, format: str = "peftc") -> Path:
        from peftc.runtime.checkpoint import save_adapter

        return save_adapter(self, directory, format=format)

    def load_adapter(self, directory) -> "CompiledModel":
        from peftc.runtime.checkpoint import load_adapter

        load_adapter(self, directory)
        return self

    # -- derived modules and views -----------------------------------------------------
    def merged(self, *, dtype: torch.dtype | None = None, requantize: bool = False,
               base_state_dict: dict | None = None) -> GraphDispatch:
        """A plain module with every mergeable adapter folded into its weight; this model is untouched.

        On a quantized base (spec `quantize`): quantized weights come back in full precision,
        dequantized W + ΔW, stored in `dtype` (default: the model's weight dtype);
        `requantize=True` packs W + ΔW again and sets `.requantization` on the result (how much
        of the adapters' effect survived); `base_state_dict` (the original model's state_dict())
        folds into the original W instead of the dequantized one.
        """
        options = {k: v for k, v in (("dtype", dtype), ("requantize", requantize),
                                     ("base_state_dict", base_state_dict)) if v not in (None, False)}
        if options and self.spec.quantize is None:
            raise ValueError(f"merged({', '.join(options)}=...) applies to a quantized base; "
                             "this model's spec has no 'quantize' section")
        return self._merge_build(**options)

    def report(self, scope: str | None = None):
        """What the passes did (from their records); `scope` keeps the site rows under one module path."""
        from peftc.inspect.report import Report

        return Report.build(self, scope)

    # -- inspection (peftc.inspect.graph_view, peftc.inspect.dot) ------------------------------------
    def diff(self, scope: str | None = None) -> str:
        """The graph before vs after as text, grouped by site; `scope` limits it to one module path."""
        from peftc.inspect.diff import diff_text

        return diff_text(self.graph_module, self.sites, self.records, scope)

    def to_dot(self, scope: str | None = None) -> str:
        """DOT text of the graph (or of `scope`), inserted nodes coloured by method."""
        from peftc.inspect.dot import to_dot

        return to_dot(self.graph_module, scope)

    def render(self, path, scope: str | None = None, format: str | None = None) -> Path:
        """Write the graph as SVG/PNG/PDF (from the suffix) with the graphviz `dot` program."""
        from peftc.inspect.dot import render

        return render(self.to_dot(scope), path, format)

    def to_networkx(self, scope: str | None = None):
        """A networkx.DiGraph, one node per graph node (attrs: op, target, module_path, shape, dtype,
        inserted_by)."""
        from peftc.inspect.graph_view import to_networkx

        return to_networkx(self.graph_module, scope)

    def extra_repr(self) -> str:
        methods = ", ".join(e.method for e in self.spec.adapters) or "none"
        return f"methods=[{methods}], sites={len({s for r in self.records for s in r.sites})}"

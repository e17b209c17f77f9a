"""CompiledModel: the rewritten graph(s), used like the original nn.Module.

It holds its Compilation (peftc.compiler.compilation) and the train plan; `merged()` is the
same compilation under a merged plan. One graph per call signature (runtime.dispatch).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from peftc.inspect.diff import diff_text
from peftc.inspect.dot import render, to_dot
from peftc.inspect.graph_view import to_networkx
from peftc.inspect.report import Report
from peftc.ir import adapters
from peftc.passes.checkpoint_layers import checkpoint_graph, set_checkpointing
from peftc.passes.quantize_base import needs_quantized_base
from peftc.pipeline.state import MergeOptions
from peftc.runtime import rank_allocation
from peftc.runtime.checkpoint import load_adapter, save_adapter
from peftc.runtime.dispatch import GraphDispatch
from peftc.runtime.facade import AdapterCheckpoint
from peftc.runtime.module_tree import share_parameters
from peftc.runtime.peft_surface import PeftModelSurface
from peftc.runtime.unload import merge_and_unload


class CompiledModel(AdapterCheckpoint, PeftModelSurface, GraphDispatch):
    """The result of `peftc.compile`: trains and evaluates like the original model."""

    supports_gradient_checkpointing = True

    def _use_first(self, first, superset=None) -> None:
        super()._use_first(first, superset)
        # The tree owns the base weights; the capture source reads them from it (FSDP2 shards them there).
        share_parameters(self.compilation.source, self)

    @property
    def spec(self):
        return self.compilation.spec

    @property
    def adapter_root(self) -> nn.Module:
        """The module tree holding every adapter parameter (mounted at `peftc` on each graph)."""
        return self.compilation.adapter_root

    # -- activation checkpointing (peftc.passes.checkpoint_layers) ---------------------------------
    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.plan.checkpoint_layers

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each layer's activations in backward: a graph rewrite, not a module wrapper.

        Graphs already built are rewritten now, later ones are built with the rewrite in their plan.
        `every_n_layers` checkpoints layers 0, n, 2n, ... as transformers does. The keyword
        arguments are accepted as transformers passes them; peftc always uses
        torch.utils.checkpoint's non-reentrant form, so `use_reentrant` has no effect.
        """
        if offload:
            raise NotImplementedError("gradient_checkpointing_enable(offload=True): peftc keeps the saved layer "
                                      "inputs in memory; offloading them is not implemented")
        self._checkpoint_every = every_n_layers
        self.plan = replace(self.plan, checkpoint_layers=True)
        for gm in self._graphs.values():
            checkpoint_graph(gm, every_n_layers)

    def gradient_checkpointing_disable(self) -> None:
        self.plan = replace(self.plan, checkpoint_layers=False)
        for gm in self._graphs.values():
            set_checkpointing(gm, False)

    def graph_built(self, gm) -> None:
        if self.plan.checkpoint_layers:  # built with the rewrite, all layers on: apply every_n_layers
            set_checkpointing(gm, True, getattr(self, "_checkpoint_every", 1))

    # transformers 5 names (Trainer calls these when they exist)
    is_activation_checkpointing = is_gradient_checkpointing

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    # -- adapter weights ---------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what the spec trains: adapter tensors by adapter name, unfrozen base params by FQN."""
        out = {name: t.detach() for name, t in self.adapter_root.state_dict(keep_vars=True).items()}
        for name, param in self.graph_module.named_parameters(remove_duplicate=False):
            if param.requires_grad and not name.startswith(adapters.ROOT + "."):
                if name in out:
                    raise RuntimeError(f"adapter name {name!r} collides with a base parameter name")
                out[name] = param.detach()
        return out

    def save_adapter(self, directory, format: str = "peftc") -> Path:
        return save_adapter(self, directory, format=format)

    def load_adapter(self, directory) -> "CompiledModel":
        load_adapter(self, directory)
        return self

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA: update importance scores and prune ranks to the step's budget (HF PEFT's name). Call it
        once per optimizer step, after optimizer.step() and before zero_grad(); under a transformers
        Trainer, pass peftc.runtime.adalora_callback.AdaloraCallback(cm) instead."""
        rank_allocation.update_and_allocate(self, global_step)

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
        options = MergeOptions.of(dtype=dtype, requantize=requantize, base_state_dict=base_state_dict,
                                  quantized_base=needs_quantized_base(self.spec))  # quantize, or LoftQ
        plan = self.compilation.merged_plan(options)
        start = self.build_under(plan)
        superset = start.superset_parts()
        merged = GraphDispatch(self.compilation, plan, start.built, self.example_call, training=self.training,
                               superset=superset)
        if plan.merge.requantization is not None:
            merged.requantization = plan.merge.requantization
        return merged

    def merge_and_unload(self, inplace: bool = False, *, dtype: torch.dtype | None = None,
                         base_state_dict: dict | None = None) -> nn.Module:
        """A model of the original class with every adapter folded in (transformers: save_pretrained works).

        A new model by default (the user's model untouched); `inplace=True` writes the merged
        weights into the user's model (then this compiled model, which shares them, is spent).
        Adapters that cannot fold (prefix, prompt, gated) raise a SpecError naming them. A
        quantized base comes back in full precision (`dtype`, `base_state_dict`: see merged()).
        """
        merged = self.merged(dtype=dtype, base_state_dict=base_state_dict)
        return merge_and_unload(self.compilation.source, merged.graph_module, inplace=inplace)

    def report(self, scope: str | None = None):
        """What the passes did (from their records); `scope` keeps the site rows under one module path."""
        return Report.build(self, scope)

    # -- inspection (peftc.inspect.graph_view, peftc.inspect.dot) ------------------------------------
    def diff(self, scope: str | None = None) -> str:
        """The graph before vs after as text, grouped by site; `scope` limits it to one module path."""
        return diff_text(self.flat_graph_module, self.sites, self.records, scope)

    def to_dot(self, scope: str | None = None) -> str:
        """DOT text of the graph (or of `scope`), inserted nodes coloured by method."""
        return to_dot(self.flat_graph_module, scope)

    def render(self, path, scope: str | None = None, format: str | None = None) -> Path:
        """Write the graph as SVG/PNG/PDF (from the suffix) with the graphviz `dot` program."""
        return render(self.to_dot(scope), path, format)

    def to_networkx(self, scope: str | None = None):
        """A networkx.DiGraph, one node per graph node (attrs: op, target, module_path, shape, dtype,
        inserted_by)."""
        return to_networkx(self.flat_graph_module, scope)

    def extra_repr(self) -> str:
        methods = ", ".join(e.method for e in self.spec.adapters) or "none"
        return f"methods=[{methods}], sites={len({s for r in self.records for s in r.sites})}"

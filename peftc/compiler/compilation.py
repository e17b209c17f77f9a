"""The one build path: a Compilation builds the graph for any call signature and any plan.

    compilation = Compilation.start(model, spec, CompileOptions(backend="torch"))
    built = compilation.build(args, kwargs, Plan.train())      # capture, sites, mount, passes

`compile`, `merged()`, `serve_adapters`, `export_onnx` (and each new call signature a compiled
model meets) all build through `Compilation.build`; nothing replays the pipeline from closures.
A Compilation is a value: the model graphs are captured from, the spec, the adapter tree every
graph mounts (so all graphs train the same parameters), the options, and the state passes
share across graphs (quantize_base's packed weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.fx import GraphModule

from peftc.capture.captured import CapturedGraphs
from peftc.capture.export import capture
from peftc.capture.sharded import bind_shards, is_sharded, without_shards
from peftc.compiler.plan import BACKENDS, Plan
from peftc.core.targets import select
from peftc.errors import ShardedError, SpecError
from peftc.ir import adapters
from peftc.ir.lora_bank import ServingPlan
from peftc.ir.modes import record_modes
from peftc.ir.quantized import quantized_weights, without_quantized_weights
from peftc.ir.sites import Site, find_sites
from peftc.passes.structure_layers import structure_layers
from peftc.pipeline.runner import PassContext, PassRecord, run_pipeline
from peftc.pipeline.state import MergeOptions, SharedState
from peftc.spec.methods import METHODS
from peftc.spec.parse import Spec


@dataclass(frozen=True)
class CompileOptions:
    backend: str = "torch"  # "torch" | "triton" | "inductor"
    copy_layers: bool = True  # capture one layer of a stack of identical layers and copy it (capture.layer_stacks)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise SpecError(f"backend: expected one of {list(BACKENDS)}, got {self.backend!r}")


@dataclass(frozen=True)
class Built:
    """One graph and what made it: the pass records and the sites as the passes left them.

    `graph_module` is the graph to run; `flat` the same graph as the passes left it, every op
    inline (the two are one object unless the plan structures layers, passes/structure_layers.py).
    """

    graph_module: GraphModule
    records: list[PassRecord]
    sites: tuple[Site, ...]
    flat: GraphModule | None = None

    def __post_init__(self):
        if self.flat is None:
            object.__setattr__(self, "flat", self.graph_module)


def sliding_windows(model: nn.Module) -> tuple:
    """Each decoder layer's sliding window (None: full attention) from a transformers config's layer_types and
    sliding_window (no layer_types: every layer slides, as Mistral's); () when no layer slides."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return ()
    config = config.get_text_config(decoder=True)
    window, layers = getattr(config, "sliding_window", None), getattr(config, "num_hidden_layers", None)
    if window is None or not isinstance(layers, int):
        return ()
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * layers
    windows = tuple(int(window) if kind == "sliding_attention" else None for kind in types)
    return windows if any(w is not None for w in windows) else ()


@dataclass(frozen=True, eq=False)
class Compilation:
    # The model graphs are captured from: a weight view of the user's (or its copy without packed weights)
    # whose modules, once a compiled model owns a tree, read their parameters from it (module_tree.share_parameters).
    source: nn.Module
    spec: Spec | None  # None for a serving compilation (its plan names the adapters)
    adapter_root: nn.Module  # mounted at `peftc` on every graph: all graphs share these parameters
    options: CompileOptions = field(default_factory=CompileOptions)
    shared: SharedState = field(default_factory=SharedState)
    captured: CapturedGraphs = field(default_factory=CapturedGraphs)  # captures a later build of the same call reuses

    @classmethod
    def start(cls, model: nn.Module, spec: Spec | None, options: CompileOptions | None = None,
              captured: CapturedGraphs | None = None) -> "Compilation":
        """`captured`: a store shared with other compilations (peftc.serving.multi_train), else its own."""
        return cls(model, spec, nn.Module(), options or CompileOptions(),
                   shared=SharedState(attention_windows=sliding_windows(model)),
                   captured=captured if captured is not None else CapturedGraphs())  # an empty store is falsy

    # The plans callers build with (peftc.compiler.plan); made here so callers need not know the passes.
    def train_plan(self, checkpoint_layers: bool = False) -> Plan:
        return Plan.train(self.options.backend, checkpoint_layers=checkpoint_layers)

    def merged_plan(self, options: MergeOptions | None = None) -> Plan:
        return Plan.merged(options)

    def export_plan(self, merge: bool, options: MergeOptions | None = None) -> Plan:
        return Plan.export(merge, options)

    def serve_plan(self, serving: ServingPlan) -> Plan:
        return Plan.serve(serving)

    def serve_export_plan(self, serving: ServingPlan) -> Plan:
        return Plan.serve_export(serving)

    def train_many_plan(self, serving: ServingPlan) -> Plan:
        return Plan.train_many(serving)

    def build(self, args: tuple, kwargs: dict, plan: Plan, *, dynamic_shapes: Any = None,
              dump_dir: Path | None = None) -> Built:
        """Capture one call signature and run `plan`'s passes on it."""
        gm = self._capture(args, kwargs, plan, dynamic_shapes)
        record_modes(gm)
        base_params = dict(gm.named_parameters(remove_duplicate=False))
        sites = tuple(find_sites(gm))
        adapters.mount(gm, self.adapter_root)
        ctx = PassContext(spec=self.spec, sites=sites, adapter_root=self.adapter_root, base_params=base_params,
                          trainable=self._trainable(base_params), methods=METHODS, shared=self.shared,
                          merge=plan.merge, serving=plan.serving)
        half_base = any(p.dtype in adapters.HALF_DTYPES for p in base_params.values())
        records, sites = run_pipeline(gm, plan.steps(self.spec, half_base), ctx, dump_dir)
        if not plan.structure_layers:
            return Built(gm, records, sites)
        structured = structure_layers(gm, checkpointed=plan.checkpoint_layers, compiled=plan.backend == "inductor")
        return Built(structured, records, sites, flat=gm)

    def _capture(self, args: tuple, kwargs: dict, plan: Plan, dynamic_shapes: Any) -> GraphModule:
        if not is_sharded(self.source):
            if dynamic_shapes is not None:
                return capture(self.source, args, kwargs, dynamic_shapes, copy_layers=self.options.copy_layers)
            gm = self.captured.reuse(self.source, args, kwargs)
            if gm is None:
                gm = capture(self.source, args, kwargs, copy_layers=self.options.copy_layers)
                self.captured.keep(self.source, args, kwargs, gm)
            return gm
        refuse_sharded(plan)
        stand_in, shards = without_shards(self.source)  # capture traces shapes; FSDP2's shards are bound back
        gm = capture(stand_in, args, kwargs, dynamic_shapes, copy_layers=self.options.copy_layers)
        bind_shards(gm, shards)
        return gm

    def after_first_build(self, built: Built) -> "Compilation":
        """The compilation later graphs build from: once quantize_base has packed weights, capture
        from a copy of the model without them, so the user's full-precision weights can be freed."""
        if self.shared.quantized is None:
            return self
        kept = dict(built.graph_module.named_parameters(remove_duplicate=False))
        packed = [p for p in quantized_weights(self.shared.quantized) if p not in kept]
        return replace(self, source=without_quantized_weights(self.source, packed), captured=CapturedGraphs())

    def _trainable(self, base_params: dict[str, nn.Parameter]) -> frozenset[str]:
        """Base FQNs `spec.trainable` unfreezes; a tied weight's other names come with it."""
        if self.spec is None or not self.spec.trainable:
            return frozenset()
        chosen = select(self.spec.trainable, list(base_params), "trainable", what="parameter name")
        chosen_ids = {id(base_params[name]) for name in chosen}
        return frozenset(name for name, p in base_params.items() if id(p) in chosen_ids)


def refuse_sharded(plan: Plan) -> None:
    """Only training graphs build on a model FSDP2 sharded: they run inside its hooks, which gather each
    layer's weights; folding, exporting and serving need whole base weights this rank does not hold."""
    if plan.name != "train":
        raise ShardedError(
            f"a {plan.name!r} graph needs the whole base weights, and FSDP2 (fully_shard) left this rank only its "
            "shard of each. Save the adapter (cm.save_adapter(dir): every rank calls it, rank 0 writes whole "
            "tensors), then on one process compile the base model again, cm.load_adapter(dir), and call "
            "merged(), merge_and_unload() or export_onnx there")

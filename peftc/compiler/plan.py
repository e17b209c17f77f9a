"""Build plans: which passes turn a captured graph into the graph a caller needs.

One spec compiles to different graphs for different uses, and each use is a plan, not a
flag threaded through the pipeline:

- `Plan.train(backend)`: the adapters as graph ops, LoRA shrinks fused (torch back end) or lowered to fused kernels (triton back end) — what `compile` returns — then
  layer-structured (each layer a module at its own path, passes/structure_layers.py; with the
  inductor back end each distinct layer program compiled once); on the torch and inductor
  back ends attention skips a mask that is only causal and the loss saves less for backward; with
  `checkpoint_layers`, each layer recomputed in backward;
- `Plan.merged(options)`: every foldable adapter folded into its weight — `cm.merged()`;
- `Plan.export(merge)`: what ONNX export reads: torch ops only, no shrink fusion, no lowering,
  merged or not, so export never has to undo a pass;
- `Plan.serve(serving)`: the multi-adapter lowering of `serve_adapters`, with the per-row
  adapter ids as one more graph input;
- `Plan.train_many(serving)`: the same lowering over each adapter's own trainable tensors,
  stacked in the graph — `train_adapters` (mLoRA-style concurrent training);
- `Plan.serve_export(serving)`: the serving graph for ONNX export, adapter ids kept as an input.

A plan that caches results across the graphs it builds (a merged plan's folded weights)
carries that state itself, so two `merged()` models never share it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from peftc.ir.lora_bank import ServingPlan
from peftc.passes.add_routing_input import add_routing_input
from peftc.passes.cast_adapter_dtype import cast_adapter_dtype
from peftc.passes.checkpoint_layers import checkpoint_layers
from peftc.passes.freeze_params import freeze_params
from peftc.passes.fuse_lora_shrinks import fuse_lora_shrinks, may_fuse
from peftc.passes.lower_bottleneck_multi import lower_bottleneck_multi
from peftc.passes.lower_cross_entropy import lower_cross_entropy
from peftc.passes.lower_lora_multi import lower_lora_multi
from peftc.passes.lower_lora_triton import lower_lora_triton
from peftc.passes.lower_prefix_multi import lower_prefix_multi
from peftc.passes.lower_prompt_multi import lower_prompt_multi
from peftc.passes.lower_scales_multi import lower_scales_multi
from peftc.passes.merge_adapters import merge_adapters
from peftc.passes.quantize_base import needs_quantized_base, quantize_base
from peftc.passes.skip_causal_masks import skip_causal_masks
from peftc.pipeline.runner import Step
from peftc.pipeline.state import MergeOptions, MergeState
from peftc.spec.methods import METHODS
from peftc.spec.parse import Spec

BACKENDS = ("torch", "triton", "inductor")


@dataclass(frozen=True, eq=False)
class Plan:
    name: str  # "train" | "merged" | "export" | "serve" | "train_many"
    backend: str = "torch"
    fuse_shrinks: bool = False
    merge: MergeState | None = None  # set: fold adapters (its weights are shared by this plan's graphs)
    serving: ServingPlan | None = None  # set: the multi-adapter lowering instead of the spec's passes
    checkpoint_layers: bool = False  # recompute each layer in backward (gradient checkpointing)
    structure_layers: bool = False  # run each layer as a module at its own path (passes/structure_layers.py)

    @classmethod
    def train(cls, backend: str = "torch", checkpoint_layers: bool = False, structure_layers: bool = True) -> "Plan":
        # Inductor fuses by itself, and the fused shrink is a custom op it could not see into.
        return cls("train", backend=backend, fuse_shrinks=backend == "torch",
                   checkpoint_layers=checkpoint_layers, structure_layers=structure_layers)

    @classmethod
    def merged(cls, options: MergeOptions | None = None) -> "Plan":
        return cls("merged", merge=MergeState(options or MergeOptions()))

    @classmethod
    def export(cls, merge: bool, options: MergeOptions | None = None) -> "Plan":
        return cls("export", merge=MergeState(options or MergeOptions()) if merge else None)

    @classmethod
    def serve(cls, serving: ServingPlan) -> "Plan":
        return cls("serve", serving=serving)

    @classmethod
    def serve_export(cls, serving: ServingPlan) -> "Plan":
        """The serving graph as export reads it: the LoRA banks through gathers (peftc::lora_gather)."""
        return cls("serve_export", serving=replace(serving, gathered=True))

    @classmethod
    def train_many(cls, serving: ServingPlan) -> "Plan":
        if serving.params is None:
            raise ValueError("Plan.train_many: the ServingPlan names no trained adapter tensors (params)")
        return cls("train_many", serving=serving)

    def steps(self, spec: Spec | None, half_base: bool = False) -> list[Step]:
        """The ordered passes of this plan for `spec` (serving plans run the multi-adapter lowering alone);
        `half_base`: some base weight is float16/bfloat16, so adapters may compute in float32."""
        if self.serving is not None:
            return [Step("add_routing_input", add_routing_input), Step("lower_lora_multi", lower_lora_multi),
                    Step("lower_scales_multi", lower_scales_multi),
                    Step("lower_bottleneck_multi", lower_bottleneck_multi),
                    Step("lower_prefix_multi", lower_prefix_multi), Step("lower_prompt_multi", lower_prompt_multi)]
        steps = []
        if needs_quantized_base(spec):  # first: adapters then see the quantized base (spec.quantize, LoftQ)
            steps.append(Step("quantize_base", quantize_base))
        steps += [Step(METHODS[entry.method].insert.__name__, METHODS[entry.method].insert, i)
                  for i, entry in enumerate(spec.adapters)]
        if half_base:  # adapters kept in float32 over it compute in float32 (spec.adapter_dtype)
            steps.append(Step("cast_adapter_dtype", cast_adapter_dtype))
        if self.fuse_shrinks and may_fuse(spec):
            steps.append(Step("fuse_lora_shrinks", fuse_lora_shrinks))
        steps.append(Step("freeze_params", freeze_params, freezes=True))
        if self.merge is not None:
            steps.append(Step("merge_adapters", merge_adapters))
        elif self.backend == "triton":
            steps.append(Step("lower_lora_triton", lower_lora_triton))
        # Training on torch (and inductor, whose top graph runs eagerly between the compiled layers):
        # attention skips a causal-only mask, and the loss saves less for backward.
        if self.name == "train" and self.backend in ("torch", "inductor"):
            steps += [Step("skip_causal_masks", skip_causal_masks), Step("lower_cross_entropy", lower_cross_entropy)]
        if self.checkpoint_layers and not self.structure_layers:  # last: a layer's outlined body holds
            steps.append(Step("checkpoint_layers", checkpoint_layers))  # every op the passes put there
        return steps

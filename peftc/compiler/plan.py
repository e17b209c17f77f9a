"""Build plans: which passes turn a captured graph into the graph a caller needs.

One spec compiles to different graphs for different uses, and each use is a plan, not a
flag threaded through the pipeline:

- `Plan.train(backend)`: the adapters as graph ops, LoRA shrinks fused (torch back end) or
  lowered to fused kernels (triton back end) — what `compile` returns;
- `Plan.merged(options)`: every foldable adapter folded into its weight — `cm.merged()`;
- `Plan.export(merge)`: what ONNX export reads: torch ops only, no shrink fusion, no lowering,
  merged or not, so export never has to undo a pass;
- `Plan.serve(serving)`: the multi-adapter lowering of `serve_adapters`.

A plan that caches results across the graphs it builds (a merged plan's folded weights)
carries that state itself, so two `merged()` models never share it.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftc.ir.lora_bank import ServingPlan
from peftc.passes.freeze_params import freeze_params
from peftc.passes.fuse_lora_shrinks import fuse_lora_shrinks, may_fuse
from peftc.passes.lower_lora_multi import lower_lora_multi
from peftc.passes.lower_lora_triton import lower_lora_triton
from peftc.passes.merge_adapters import merge_adapters
from peftc.passes.quantize_base import quantize_base
from peftc.pipeline.runner import Step
from peftc.pipeline.state import MergeOptions, MergeState
from peftc.spec.methods import METHODS
from peftc.spec.parse import Spec

BACKENDS = ("torch", "triton")


@dataclass(frozen=True, eq=False)
class Plan:
    name: str  # "train" | "merged" | "export" | "serve"
    backend: str = "torch"
    fuse_shrinks: bool = False
    merge: MergeState | None = None  # set: fold adapters (its weights are shared by this plan's graphs)
    serving: ServingPlan | None = None  # set: the multi-adapter lowering instead of the spec's passes

    @classmethod
    def train(cls, backend: str = "torch") -> "Plan":
        return cls("train", backend=backend, fuse_shrinks=backend == "torch")

    @classmethod
    def merged(cls, options: MergeOptions | None = None) -> "Plan":
        return cls("merged", merge=MergeState(options or MergeOptions()))

    @classmethod
    def export(cls, merge: bool, options: MergeOptions | None = None) -> "Plan":
        return cls("export", merge=MergeState(options or MergeOptions()) if merge else None)

    @classmethod
    def serve(cls, serving: ServingPlan) -> "Plan":
        return cls("serve", serving=serving)

    def steps(self, spec: Spec | None) -> list[Step]:
        """The ordered passes of this plan for `spec` (serving plans run the multi-adapter lowering alone)."""
        if self.serving is not None:
            return [Step("lower_lora_multi", lower_lora_multi)]
        steps = []
        if spec.quantize is not None:  # first: adapters then see the quantized base
            steps.append(Step("quantize_base", quantize_base))
        steps += [Step(METHODS[entry.method].insert.__name__, METHODS[entry.method].insert, i)
                  for i, entry in enumerate(spec.adapters)]
        if self.fuse_shrinks and may_fuse(spec):
            steps.append(Step("fuse_lora_shrinks", fuse_lora_shrinks))
        steps.append(Step("freeze_params", freeze_params, freezes=True))
        if self.merge is not None:
            steps.append(Step("merge_adapters", merge_adapters))
        elif self.backend == "triton":
            steps.append(Step("lower_lora_triton", lower_lora_triton))
        return steps

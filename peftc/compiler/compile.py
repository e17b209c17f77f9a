"""peftc.compile: capture, resolve sites, run the spec's passes, wrap the result."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from peftc.capture.captured import CapturedGraphs
from peftc.capture.example_inputs import example_call
from peftc.compiler.calibrate import calibrate
from peftc.compiler.compilation import Compilation, CompileOptions
from peftc.compiler.early_targets import check_targets
from peftc.core.all_linear import all_linear_names, is_all_linear
from peftc.compiler.first_build import build_first
from peftc.ir.inductor_warmup import start_cpu_probes, wait_for_probes
from peftc.runtime.compiled import CompiledModel
from peftc.runtime.user_model import kept_unchanged, weight_view
from peftc.spec.parse import Spec, as_spec


def compile(model: nn.Module, spec: Any, *, example_inputs: Any = None, example_kwargs: dict | None = None,
            dynamic_shapes: Any = None, dump_dir: str | Path | None = None, backend: str = "torch",
            copy_layers: bool = True, gradient_checkpointing: bool = False, calibration: Any = None) -> CompiledModel:
    """Compile `model` with the PEFT `spec` (a Spec, a dict, or a path to a spec file).

    The model is never changed, on success or failure (parameters, requires_grad flags, every
    submodule's mode, hooks, buffers): graphs are captured from a weight view of it, which
    shares its memory but not its Parameter objects (peftc.runtime.user_model).
    `copy_layers=False` exports every layer of identical layer stacks instead of copying
    the second one (see peftc.capture.layer_stacks). `gradient_checkpointing=True` compiles with
    per-layer recomputation in backward (as `cm.gradient_checkpointing_enable()` later does).
    `backend`: "torch" (graph ops), "triton" (LoRA sites lowered to fused Triton kernels where a
    GPU runs them) or "inductor" (each distinct layer program compiled once by torch.compile,
    for every layer that runs it: passes/structure_layers.py).
    `calibration` is the data LoRA's inits "corda" and "eva" start from: an iterable of model inputs,
    or a function that calls the model it is given (peftc.compiler.calibrate).
    """
    return compile_sharing_captures(model, spec, None, example_inputs=example_inputs, example_kwargs=example_kwargs,
                                    dynamic_shapes=dynamic_shapes, dump_dir=dump_dir, backend=backend,
                                    copy_layers=copy_layers, gradient_checkpointing=gradient_checkpointing,
                                    calibration=calibration)


def compile_sharing_captures(model: nn.Module, spec: Any, captured: CapturedGraphs | None, *,
                             example_inputs: Any = None, example_kwargs: dict | None = None, dynamic_shapes: Any = None,
                             dump_dir: str | Path | None = None, backend: str = "torch", copy_layers: bool = True,
                             gradient_checkpointing: bool = False, calibration: Any = None) -> CompiledModel:
    """`compile`, its captures kept in (and reused from) `captured`, a store compilations made together from one
    model share (`CapturedGraphs(across_views=True)`: train_adapters' per-adapter models); None: its own."""
    spec = with_all_linear_resolved(as_spec(spec), model)
    check_targets(model, spec)  # a target naming nothing in the model fails before the capture's seconds
    if backend == "inductor" and any(p.device.type == "cpu" for p in model.parameters()):
        start_cpu_probes()  # Inductor's C++ start-up, in threads while the capture runs
    view = weight_view(model)  # the user's storage; our own Parameter objects, flags and modes
    compilation = Compilation.start(view, spec, CompileOptions(backend=backend, copy_layers=copy_layers), captured)
    args, kwargs = example_call(model, example_inputs, example_kwargs)
    plan = compilation.train_plan(checkpoint_layers=gradient_checkpointing)
    with kept_unchanged(model):  # a second guard: nothing above should touch the user's model
        compilation = calibrate(compilation, args, kwargs, calibration)
        start = build_first(compilation, (args, kwargs), plan, dynamic_shapes=dynamic_shapes,
                            dump_dir=Path(dump_dir) if dump_dir is not None else None)
    compilation.shared.calibration = None  # read only when the adapter weights were made, just now
    wait_for_probes()  # answered before the first compiled call needs them; no thread outlives compile()
    superset = start.superset_parts()
    return CompiledModel(compilation.after_first_build(start.built), plan, start.built, (args, kwargs),
                         training=model.training, superset=superset)


def with_all_linear_resolved(spec: Spec, model: nn.Module) -> Spec:
    """`spec` with each entry whose targets are PEFT's `"all-linear"` targeting the model's linear modules but
    the output layer, by full name, as PEFT's get_peft_model resolves it (peftc.core.all_linear); the compiled
    model's spec, report and PEFT checkpoints then name them."""
    adapters = tuple(dataclasses.replace(entry, targets=tuple(all_linear_names(model)))
                     if is_all_linear(getattr(entry, "targets", ())) else entry for entry in spec.adapters)
    return spec if adapters == spec.adapters else dataclasses.replace(spec, adapters=adapters)

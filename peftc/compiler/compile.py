"""peftc.compile: capture, resolve sites, run the spec's passes, wrap the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.fx import GraphModule

from peftc.ir import adapters
from peftc.capture.export import CallSignature, capture, hf_example_inputs, is_hf_model, normalize_call
from peftc.runtime.compiled import CompiledModel, GraphDispatch
from peftc.runtime.user_model import kept_unchanged, weight_view
from peftc.errors import CaptureError, SpecError
from peftc.spec.methods import METHODS
from peftc.ir.modes import record_modes
from peftc.pipeline.runner import PassContext, PassRecord, Step, run_pipeline
from peftc.ir.sites import Site, find_sites
from peftc.spec.parse import Spec

BACKENDS = ("torch", "triton")


def compile(model: nn.Module, spec: Any, *, example_inputs: Any = None, example_kwargs: dict | None = None,
            dynamic_shapes: Any = None, dump_dir: str | Path | None = None, backend: str = "torch",
            copy_layers: bool = True) -> CompiledModel:
    """Compile `model` with the PEFT `spec` (a Spec, a dict, or a path to a spec file).

    The model is never changed, on success or failure (parameters, requires_grad flags, every
    submodule's mode, hooks, buffers): the compiled model captures a weight view of it
    (peftc.runtime.user_model).
    `copy_layers=False` exports every layer of identical layer stacks instead of copying
    the second one (see peftc.capture.layer_stacks).
    """
    spec = as_spec(spec)
    if backend not in BACKENDS:
        raise SpecError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    args, kwargs = example_call(model, example_inputs, example_kwargs)
    view = weight_view(model)  # the user's storage, our own Parameter objects, flags and modes
    adapter_root = nn.Module()
    shared: dict = {}  # what passes hand to the same pass on other graphs (quantize_base's packed weights)
    with kept_unchanged(model):
        gm, records, sites = build_graph(view, spec, adapter_root, args, kwargs, dynamic_shapes,
                                         dump_dir=Path(dump_dir) if dump_dir is not None else None,
                                         backend=backend, state=shared, copy_layers=copy_layers)
    source = _recapture_source(view, gm, shared)

    def build(call_args: tuple, call_kwargs: dict) -> GraphModule:
        return build_graph(source, spec, adapter_root, call_args, call_kwargs, backend=backend, state=shared,
                           copy_layers=copy_layers)[0]

    def merge_build(**options) -> GraphDispatch:
        state: dict = {**shared, "merge_options": options}

        def build_merged(call_args: tuple, call_kwargs: dict) -> GraphModule:
            return build_graph(source, spec, adapter_root, call_args, call_kwargs, merge=True, state=state,
                               copy_layers=copy_layers)[0]

        merged = GraphDispatch(source, build_merged(args, kwargs), CallSignature.of(args, kwargs), build_merged,
                               training=cm.training)
        if "requantization" in state:
            merged.requantization = state["requantization"]
        return merged

    cm = CompiledModel(source, gm, CallSignature.of(args, kwargs), build, training=model.training, spec=spec,
                       records=records, sites=sites, adapter_root=adapter_root, merge_build=merge_build)
    return cm


def _recapture_source(model: nn.Module, gm: GraphModule, shared: dict) -> nn.Module:
    """The model later graphs are captured from: the user's, minus the weights quantize_base packed away."""
    from peftc.passes.quantize_base import STATE_KEY
    from peftc.ir.quantized import quantized_weights, without_quantized_weights

    if STATE_KEY not in shared:
        return model
    kept = dict(gm.named_parameters(remove_duplicate=False))
    return without_quantized_weights(model, [p for p in quantized_weights(shared[STATE_KEY]) if p not in kept])


def as_spec(spec: Any) -> Spec:
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (str, Path)):
        return Spec.load(spec)
    return Spec.from_dict(spec)


def example_call(model: nn.Module, example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    if example_inputs is None and example_kwargs is None:
        if not is_hf_model(model):
            raise CaptureError(
                f"{type(model).__name__} is not a transformers model, so peftc cannot build example inputs; "
                "pass example_inputs=(tensor, ...) and/or example_kwargs={...} to peftc.compile")
        return normalize_call(model, (), hf_example_inputs(model))
    if example_inputs is None:
        example_inputs = ()
    elif not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return normalize_call(model, example_inputs, dict(example_kwargs or {}))


def plan(spec: Spec, merge: bool, backend: str = "torch") -> list[Step]:
    """The spec as an ordered list of passes."""
    from peftc.passes.freeze_params import freeze_params
    from peftc.passes.merge_adapters import merge_adapters

    steps = []
    if spec.quantize is not None:  # first: adapters then see the quantized base
        from peftc.passes.quantize_base import quantize_base

        steps.append(Step("quantize_base", quantize_base))
    steps += [Step(METHODS[entry.method].insert.__name__, METHODS[entry.method].insert, i)
              for i, entry in enumerate(spec.adapters)]
    if not merge and backend == "torch":  # merging drops the shrinks; lowering fuses each site's on its own
        from peftc.passes.fuse_lora_shrinks import fuse_lora_shrinks, may_fuse

        if may_fuse(spec):
            steps.append(Step("fuse_lora_shrinks", fuse_lora_shrinks))
    steps.append(Step("freeze_params", freeze_params))
    if merge:
        steps.append(Step("merge_adapters", merge_adapters))
    elif backend == "triton":  # a merged graph has no LoRA branch left to fuse
        from peftc.passes.lower_lora_triton import lower_lora_triton

        steps.append(Step("lower_lora_triton", lower_lora_triton))
    return steps


def build_graph(model: nn.Module, spec: Spec, adapter_root: nn.Module, args: tuple, kwargs: dict,
                dynamic_shapes: Any = None, *, merge: bool = False, state: dict | None = None,
                dump_dir: Path | None = None, backend: str = "torch",
                copy_layers: bool = True) -> tuple[GraphModule, list[PassRecord], list[Site]]:
    """Capture one call signature and run the spec's passes on it."""
    gm = capture(model, args, kwargs, dynamic_shapes, copy_layers=copy_layers)
    record_modes(gm)
    base_params = dict(gm.named_parameters(remove_duplicate=False))
    sites = find_sites(gm)
    adapters.mount(gm, adapter_root)
    ctx = PassContext(spec=spec, sites=sites, adapter_root=adapter_root, base_params=base_params,
                      state=state if state is not None else {})
    records = run_pipeline(gm, plan(spec, merge, backend), ctx, dump_dir)
    return gm, records, sites

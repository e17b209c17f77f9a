"""peftc.compile: capture, resolve sites, run the spec's passes, wrap the result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from peftc.capture.example_inputs import example_call
from peftc.compiler.compilation import Compilation, CompileOptions
from peftc.runtime.compiled import CompiledModel
from peftc.spec.parse import as_spec


def compile(model: nn.Module, spec: Any, *, example_inputs: Any = None, example_kwargs: dict | None = None,
            dynamic_shapes: Any = None, dump_dir: str | Path | None = None, backend: str = "torch",
            copy_layers: bool = True) -> CompiledModel:
    """Compile `model` with the PEFT `spec` (a Spec, a dict, or a path to a spec file).

    On failure the model is left exactly as it was (parameters, requires_grad flags, mode).
    `copy_layers=False` exports every layer of identical layer stacks instead of copying
    the second one (see peftc.capture.layer_stacks).
    """
    compilation = Compilation.start(model, as_spec(spec), CompileOptions(backend=backend, copy_layers=copy_layers))
    args, kwargs = example_call(model, example_inputs, example_kwargs)
    saved = _user_state(model)
    plan = compilation.train_plan()
    try:
        built = compilation.build(args, kwargs, plan, dynamic_shapes=dynamic_shapes,
                                  dump_dir=Path(dump_dir) if dump_dir is not None else None)
    except BaseException:
        _restore(model, saved)
        raise
    return CompiledModel(compilation.after_first_build(built), plan, built, (args, kwargs),
                         training=saved["training"])


def _user_state(model: nn.Module) -> dict:
    return {"training": model.training,
            "requires_grad": {id(p): (p, p.requires_grad) for p in model.parameters()}}


def _restore(model: nn.Module, saved: dict) -> None:
    model.train(saved["training"])
    for param, flag in saved["requires_grad"].values():
        param.requires_grad_(flag)

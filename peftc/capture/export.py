"""Capture: nn.Module + example inputs -> an ATen training-IR GraphModule (torch.export, non-strict).

Capture always runs the model in train mode, so dropout and batch-norm nodes appear with
their training behaviour; `peftc.ir.modes` flips them for eval. Batch and sequence dimensions
are exported as `Dim.AUTO`: dynamic wherever the model allows it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from peftc.capture import layer_stacks
from peftc.errors import CaptureError

COPIED_LAYERS = "peftc_copied_layers"  # gm.meta key: which layers capture copied instead of tracing
EXAMPLE_BATCH = 2
EXAMPLE_SEQ = 7  # distinct from the batch size, so export does not unify the two dims


@dataclass(frozen=True)
class CallSignature:
    """What a graph is specialized on: argument positions and names, which are tensors, constants."""

    args: tuple
    kwargs: tuple

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> "CallSignature":
        return cls(
            args=tuple(_kind(a) for a in args),
            kwargs=tuple(sorted((k, _kind(v)) for k, v in kwargs.items())),
        )

    def describe(self) -> str:
        parts = [f"arg{i}:{k}" for i, k in enumerate(self.args)]
        parts += [f"{name}={k}" for name, k in self.kwargs]
        return "(" + ", ".join(parts) + ")"


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor[{value.dim()}d,{value.dtype}]".replace("torch.", "")
    if isinstance(value, (list, tuple)):
        return type(value).__name__ + "(" + ",".join(_kind(v) for v in value) + ")"
    return repr(value)


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "main_input_name")


def forward_parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def normalize_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """HF models: default `use_cache=False`, since a KV cache is not a training input or output."""
    if is_hf_model(model) and "use_cache" in forward_parameters(model) and "use_cache" not in kwargs:
        kwargs = {**kwargs, "use_cache": False}
    return args, kwargs


def hf_example_inputs(model: nn.Module) -> dict:
    """Example inputs for a transformers model, built from `main_input_name` and the config.

    `model.dummy_inputs` is not enough: for vision models such as ViT it returns input_ids.
    """
    config = model.config
    name = model.main_input_name
    params = forward_parameters(model)
    device = _model_device(model)
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 2
        ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), device=device)
        inputs = {"input_ids": ids}
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones_like(ids)
        return inputs
    if name == "pixel_values":
        size = _as_pair(getattr(config, "image_size", 224))
        channels = getattr(config, "num_channels", 3)
        dtype = _model_dtype(model)
        return {"pixel_values": torch.randn(EXAMPLE_BATCH, channels, *size, device=device, dtype=dtype)}
    raise CaptureError(
        f"peftc cannot build example inputs for a model whose main input is {name!r}; "
        "pass example_inputs=(...) or example_kwargs={...} to peftc.compile"
    )


def _as_pair(size: Any) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.float32


def widen(value: Any) -> Any:
    """Grow size-1 batch (and, for integer tensors, sequence) dims to 2.

    torch.export specializes dims of size 1, so an example with batch 1 would give a graph
    that only accepts batch 1.
    """
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    dims = [0] if value.is_floating_point() or value.dim() < 2 else [0, 1]
    for d in dims:
        if value.shape[d] == 1:
            value = torch.cat([value, value], dim=d)
    return value


def auto_dynamic_shapes(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Dim.AUTO on the batch dim of every tensor, and the sequence dim of integer tensors."""

    def spec_for(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            dims = [0] if value.is_floating_point() or value.dim() < 2 else [0, 1]
            if value.is_floating_point() and value.dim() >= 3:
                dims = list(range(value.dim()))  # images / sequences of features: let export decide
            return {d: Dim.AUTO for d in dims}
        if isinstance(value, (list, tuple)):
            return type(value)(spec_for(v) for v in value)
        return None

    return tuple(spec_for(a) for a in args), {k: spec_for(v) for k, v in kwargs.items()}


def capture(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None,
            copy_layers: bool = True) -> torch.fx.GraphModule:
    """Export `model` in train mode and return the unlifted GraphModule (params by FQN).

    With `copy_layers`, stacks of identical layers are exported as two layers and copied
    (`peftc.capture.layer_stacks`); if that cannot be done exactly, every layer is exported.
    """
    if dynamic_shapes is None:
        args = tuple(widen(a) for a in args)
        kwargs = {k: widen(v) for k, v in kwargs.items()}
        dyn_args, dyn_kwargs = auto_dynamic_shapes(args, kwargs)
        dynamic_shapes = _as_export_dynamic_shapes(model, dyn_args, dyn_kwargs)
    stacks = layer_stacks.find_stacks(model) if copy_layers else []
    if stacks:
        try:
            with layer_stacks.cut_to_two(model, stacks):
                gm = _export(model, args, kwargs, dynamic_shapes)
            layer_stacks.copy_layers(gm, stacks)
            gm.meta[COPIED_LAYERS] = [f"{s.path}.{{2..{len(s.layers) - 1}}} copied from {s.path}.1" for s in stacks]
            return gm
        except (layer_stacks.NotCopyable, CaptureError):
            pass  # export every layer; its errors, if any, are the ones to report
    return _export(model, args, kwargs, dynamic_shapes)


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> torch.fx.GraphModule:
    was_training = model.training
    model.train()
    try:
        program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # export raises many types; keep its message as the reason
        reason = f"{type(err).__name__}: {err}"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {reason.splitlines()[0][:500]}\n"
            "Try: pass example_inputs/example_kwargs that match a real call, make data-dependent "
            "Python control flow tensor-free, or pass dynamic_shapes=... to fix the dims yourself.",
            reason=reason,
        ) from err
    finally:
        model.train(was_training)
    return program.module()


def _as_export_dynamic_shapes(model: nn.Module, dyn_args: tuple, dyn_kwargs: dict) -> Any:
    """torch.export wants dynamic shapes keyed like forward's parameters when kwargs are used."""
    if not dyn_kwargs:
        return dyn_args
    names = forward_parameters(model)
    shapes = {}
    for i, spec in enumerate(dyn_args):
        shapes[names[i]] = spec
    shapes.update(dyn_kwargs)
    return shapes

"""Capture: nn.Module + example inputs -> an ATen training-IR GraphModule (torch.export, non-strict).

Capture always runs the model in train mode, so dropout and batch-norm nodes appear with
their training behaviour; `peftc.ir.modes` flips them for eval. Batch and sequence dimensions
are exported as `Dim.AUTO`: dynamic wherever the model allows it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.export import Dim

from peftc.capture import layer_stacks
from peftc.capture.binding import with_named_keywords
from peftc.capture.cache_points import tag_cache_points
from peftc.capture.calls import forward_parameters
from peftc.capture.model_kept import model_kept
from peftc.capture.size_bounds import relax_inferred_bounds
from peftc.errors import CaptureError

COPIED_LAYERS = "peftc_copied_layers"  # gm.meta key: which layers capture copied instead of tracing


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


def unaliased(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example call with every tensor that shares storage with an earlier one cloned.

    torch.export traces aliased inputs as one: given `labels=input_ids` (the same tensor, as users
    write examples), the graph looks the token embeddings up from `labels`, and every later call with
    other labels (-100 padding) would embed those. Distinct example tensors give each input its own uses.
    """
    seen: set[tuple] = set()

    def distinct(value: Any) -> Any:
        if type(value) is not torch.Tensor or value.device.type == "meta":  # not DTensors, fakes, stand-ins
            return value
        storage = (value.device, value.untyped_storage().data_ptr())
        if storage in seen:
            return value.clone()
        seen.add(storage)
        return value

    return torch.utils._pytree.tree_map(distinct, (args, kwargs))


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
    What the traced forward leaves on the model (output-recording hooks on the cut stack, a
    classifier's `config.problem_type`) is undone (`model_kept`).
    """
    with model_kept(model):
        return _capture(model, args, kwargs, dynamic_shapes, copy_layers)


def _capture(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, copy_layers: bool) -> torch.fx.GraphModule:
    model = with_named_keywords(model, kwargs)  # export cannot key dynamic shapes inside **kwargs
    args, kwargs = unaliased(args, kwargs)
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
            f"Try: {_fix_for(reason)}",
            reason=reason,
        ) from err
    finally:
        model.train(was_training)
    relax_inferred_bounds(program, dynamic_shapes)
    return tag_cache_points(return_uncast_outputs(drop_dtype_asserts(program.module())))


KV_CACHE_IN_OUTPUT = "cache_utils"  # export's "Found <class 'transformers.cache_utils.DynamicCache'> in output"


def _fix_for(reason: str) -> str:
    if "in output" in reason and KV_CACHE_IN_OUTPUT in reason:
        # A capture whose output holds transformers' cache object: compiled and served models route
        # use_cache=True calls to graphs with the cache as tensors (peftc.runtime.forward_cache).
        return ("this call returns a KV cache object (use_cache=True), which this graph cannot return; call "
                "peftc.compile(...) or peftc.serve_adapters(...) and their forward with use_cache=True (or their "
                "generate(...)) for cached decoding, or pass use_cache=False")
    return ("pass example_inputs/example_kwargs that match a real call, make data-dependent "
            "Python control flow tensor-free, or pass dynamic_shapes=... to fix the dims yourself.")


def drop_dtype_asserts(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove `aten._assert_tensor_metadata` checks: they pin every `.to()` input to its traced dtype.

    Under an ambient autocast (Trainer's bf16=True) the graph's matmuls dispatch through autocast as
    the original module's do, so a `.float()` (logits, the loss) sees bfloat16 where capture saw
    float32; the original runs there, and so must the graph. The checks compute nothing.
    """
    asserts = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _ASSERT_METADATA]
    for node in asserts:
        gm.graph.erase_node(node)
    if asserts:
        gm.recompile()
    return gm


_ASSERT_METADATA = torch.ops.aten._assert_tensor_metadata.default
_DTYPE_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten._to_copy.default)


def return_uncast_outputs(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Return a loss function's `.float()` of an output as the output itself, as the original does.

    transformers' causal-LM losses start with `logits = logits.float()`; at capture the logits are float32,
    so that cast returns the very tensor the model returns, and export records the model's `logits` output
    as the cast. Under an ambient autocast (Trainer's bf16=True) the original returns the bfloat16 logits
    and only its loss sees the float32 copy: the graph must do the same. A cast the model's own code
    returns (`return logits.float()`) is kept; the loss's is told apart by the call it was traced in.
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = output.args[0]
    if not isinstance(leaves, (tuple, list)):
        return gm
    uncast = [_uncast(leaf) for leaf in leaves]
    if all(a is b for a, b in zip(uncast, leaves)):
        return gm
    output.args = (type(leaves)(uncast),)
    gm.recompile()
    return gm


def _uncast(node: Any) -> Any:
    """The input of `node` if it is a no-op dtype cast (at capture) made inside a loss-function call."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _DTYPE_CASTS):
        return node
    source = node.args[0]
    same_dtype = (isinstance(source, torch.fx.Node) and isinstance(source.meta.get("val"), torch.Tensor)
                  and isinstance(node.meta.get("val"), torch.Tensor)
                  and source.meta["val"].dtype == node.meta["val"].dtype)
    return source if same_dtype and _traced_in_loss_call(node) else node


def _traced_in_loss_call(node: torch.fx.Node) -> bool:
    """Whether the innermost model-code line export recorded for `node` calls a loss (`self.loss_function(`):
    the cast happened inside transformers' loss, not in the model's own return."""
    lines = [line.strip() for line in (node.meta.get("stack_trace") or "").splitlines() if line.strip()]
    return bool(lines) and not lines[-1].startswith("File ") and "loss_function(" in lines[-1]


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

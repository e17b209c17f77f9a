"""What an exported graph is called with and what it returns: example inputs and output names.

A captured graph module keeps its calling convention as pytree specs (the model's own
argument names, e.g. input_ids / attention_mask / use_cache=False, and an output structure
such as CausalLMOutputWithPast(logits)). The ONNX graph is named after them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils import _pytree as pytree


def placeholder_values(gm: GraphModule) -> list[Any]:
    """The example value each placeholder was captured with (fake tensors for tensor inputs)."""
    return [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]


def example_call(gm: GraphModule) -> tuple[tuple, dict]:
    """Concrete (args, kwargs) shaped like the example the graph was captured from."""
    leaves = [_concrete(v) for v in placeholder_values(gm)]
    args, kwargs = pytree.tree_unflatten(leaves, gm.graph._codegen.pytree_info.in_spec)
    return tuple(args), dict(kwargs)


def _concrete(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    shape = [_hint(s) for s in value.shape]
    if value.dtype.is_floating_point:
        return torch.randn(shape, dtype=value.dtype)
    return torch.ones(shape, dtype=value.dtype)  # valid token ids and an all-ones mask


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = size.node.hint
    if hint is None:
        raise ValueError(f"cannot build an example input: a dimension ({size}) has no example value; "
                         "pass example_inputs= to export_onnx")
    return int(hint)


def dynamic_shapes(args: tuple, kwargs: dict, gm: GraphModule) -> Any:
    """Dim.AUTO on every dimension the captured graph left symbolic (batch, sequence, ...).

    Shaped as torch.export wants it for a `forward(*args, **kwargs)` graph module: a tuple
    for positional inputs, a dict by name for keyword inputs.
    """
    symbolic = iter([_symbolic_dims(v) for v in placeholder_values(gm)])
    leaves, spec = pytree.tree_flatten((args, kwargs))
    shapes = []
    for leaf in leaves:
        dims = next(symbolic, set())
        if isinstance(leaf, torch.Tensor):
            shapes.append({d: Dim.AUTO for d in sorted(dims)} or None)
        else:
            shapes.append(None)
    out_args, out_kwargs = pytree.tree_unflatten(shapes, spec)
    if not out_kwargs:
        return tuple(out_args)
    if out_args:
        return {"args": tuple(out_args), **out_kwargs}
    return dict(out_kwargs)


def _symbolic_dims(value: Any) -> set[int]:
    if not isinstance(value, torch.Tensor):
        return set()
    return {i for i, s in enumerate(value.shape) if not isinstance(s, int)}


def output_names(gm: GraphModule) -> list[str]:
    """Names for the flattened outputs: dict / ModelOutput keys (logits, ...), else output_<i>."""
    return _names(gm.graph._codegen.pytree_info.out_spec, "")


def _names(spec: pytree.TreeSpec, prefix: str) -> list[str]:
    if spec.is_leaf():
        return [prefix or "output"]
    keys = spec.context if isinstance(spec.context, (list, tuple)) else None
    names = []
    for i in range(spec.num_children):
        child = spec.child(i)
        part = str(keys[i]) if keys is not None and len(keys) == spec.num_children else f"output_{i}"
        if prefix:
            part = f"{prefix}.{part}" if keys is not None else f"{prefix}_{i}"
        names.extend(_names(child, part))
    return names

"""Small helpers for rewriting captured graphs while keeping their metadata whole.

Every node a pass inserts carries `meta["peftc"]` (which pass, method, site and entry put it
there), the module stack of the site it belongs to, and `meta["val"]` (a fake tensor with
the node's shape and dtype), so later passes, the report and the exporters can rely on it.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

PROVENANCE_KEY = "peftc"


def fake_mode_of(gm: GraphModule):
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return None


class Inserter:
    """Inserts nodes one after another, starting after `anchor`, tagged with `provenance`."""

    def __init__(self, gm: GraphModule, anchor: Node, provenance: dict, fake_mode=None,
                 meta_cache: dict | None = None):
        self.gm = gm
        # Fake-tensor results keyed by (op, argument shapes): layers repeat the same shapes,
        # so one symbolic computation serves them all. Pass one dict for a whole pass.
        self.meta_cache = meta_cache if meta_cache is not None else {}
        self.cursor = anchor
        self.provenance = dict(provenance)
        self.module_stack = anchor.meta.get("nn_module_stack")
        self.fake_mode = fake_mode if fake_mode is not None else fake_mode_of(gm)
        self.inserted: list[Node] = []

    def call(self, op, *args, **kwargs) -> Node:
        with self.gm.graph.inserting_after(self.cursor):
            node = self.gm.graph.call_function(op, args, kwargs)
        self._tag(node, self._fake_result(op, args, kwargs))
        return node

    def get_attr(self, target: str) -> Node:
        with self.gm.graph.inserting_after(self.cursor):
            node = self.gm.graph.get_attr(target)
        value = self.gm.get_parameter(target) if _is_param(self.gm, target) else self.gm.get_buffer(target)
        self._tag(node, self._fake_tensor(value))
        return node

    def _tag(self, node: Node, val: Any) -> None:
        node.meta[PROVENANCE_KEY] = dict(self.provenance)
        if self.module_stack is not None:
            node.meta["nn_module_stack"] = self.module_stack
        if val is not None:
            node.meta["val"] = val
        self.cursor = node
        self.inserted.append(node)

    def _fake_tensor(self, value: torch.Tensor):
        if self.fake_mode is None:
            return None
        return self.fake_mode.from_tensor(value, static_shapes=True)

    def _fake_result(self, op, args, kwargs):
        # An adapter's nodes (tagged with a slot) compute in one float dtype once cast_adapter_dtype ran.
        adapter = self.provenance.get("slot") is not None
        return fake_result(self.fake_mode, self.meta_cache, op, args, kwargs, common_float_dtype=adapter)


def fake_result(fake_mode, meta_cache: dict, op, args, kwargs, common_float_dtype: bool = False):
    """The fake tensor `op(*args, **kwargs)` gives on its arguments' `meta["val"]`, or None;
    `common_float_dtype`: as if its float inputs were cast to their promoted dtype first."""
    if fake_mode is None:
        return None
    try:
        fake_args, fake_kwargs = map_arg((args, kwargs), lambda n: n.meta.get("val"))
        key = (op, common_float_dtype, _meta_key(fake_args), _meta_key(tuple(fake_kwargs.items())))
        if key not in meta_cache:
            with fake_mode:
                if common_float_dtype:
                    fake_args, fake_kwargs = _common_float_dtype((fake_args, fake_kwargs))
                rule = _SHAPE_RULES.get(op)
                meta_cache[key] = (rule(*fake_args, **fake_kwargs) if rule is not None
                                   else op(*fake_args, **fake_kwargs))
        return meta_cache[key]
    except Exception:  # shape metadata is a convenience; a failure here must not block the rewrite
        return None


def _common_float_dtype(values):
    """`values` with every float tensor in their promoted dtype, when they differ: the result the op has
    once its inputs are cast to agree (a bfloat16 input of a float32 adapter, passes/cast_adapter_dtype.py),
    and no failing meta kernel on the way."""
    def promotes(v) -> bool:  # a 0-d tensor does not promote a tensor of its kind (x_bf16 * scale_fp32 is bf16)
        return isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0

    dtypes = {v.dtype for v in pytree.tree_leaves(values) if promotes(v)}
    if len(dtypes) < 2:
        return values
    common = functools.reduce(torch.promote_types, dtypes)
    return pytree.tree_map(lambda v: v.to(common) if promotes(v) else v, values)


def refresh_meta(gm: GraphModule, nodes: list[Node], meta_cache: dict) -> None:
    """Recompute `meta["val"]` of `nodes` (call_function nodes, in graph order) after their inputs changed."""
    fake_mode = fake_mode_of(gm)
    for node in nodes:
        if node.op == "call_function":
            val = fake_result(fake_mode, meta_cache, node.target, node.args, node.kwargs)
            if val is not None:
                node.meta["val"] = val


def _meta_key(values) -> tuple:
    return tuple(
        (str(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor)
        else _meta_key(v) if isinstance(v, (list, tuple)) else repr(v)
        for v in values
    )


# Running aten.linear & co. on symbolic fake tensors costs tens of ms per node (it decomposes
# and guards); these rules build the same result metadata with one allocation.
def _linear_meta(x, w, *_, **__):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _same_as_first(x, *_, **__):
    return x.new_empty(x.shape)


def _broadcast_meta(x, y, *_, **__):
    dtype = torch.result_type(x, y)  # a bfloat16 output plus a float32 update is float32
    if isinstance(y, torch.Tensor) and tuple(y.shape) != tuple(x.shape):
        return torch.empty(torch.broadcast_shapes(x.shape, y.shape), dtype=dtype, device=x.device)
    return x.new_empty(x.shape, dtype=dtype)


def _split_meta(x, sizes, dim=0, *_, **__):
    dim = dim % x.dim()
    return [x.new_empty((*x.shape[:dim], size, *x.shape[dim + 1:])) for size in sizes]


_SHAPE_RULES = {
    torch.ops.aten.split_with_sizes.default: _split_meta,
    torch.ops.aten.linear.default: _linear_meta,
    torch.ops.aten.dropout.default: _same_as_first,
    torch.ops.aten.mul.Tensor: _broadcast_meta,
    torch.ops.aten.add.Tensor: _broadcast_meta,
}


def _is_param(gm: GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def redirect_users(users: list[Node], old: Node, new: Node) -> None:
    """Make `users` (taken before the rewrite) read `new` where they read `old`."""
    for user in users:
        user.replace_input_with(old, new)


def provenance(node: Node) -> dict | None:
    return node.meta.get(PROVENANCE_KEY)


def erase_nodes(gm: GraphModule, nodes: list[Node]) -> None:
    """Erase `nodes` (users first)."""
    for node in reversed(sorted(nodes, key=_position(gm))):
        gm.graph.erase_node(node)


def _position(gm: GraphModule):
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: order[n]

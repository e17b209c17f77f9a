"""Facts about one graph node for people: its module path, shape, dtype and a one-line text.

Used by the pipeline's change records (as text, before a pass rewrites the node) and by every
inspection view.
"""

from __future__ import annotations

import types

import torch
from torch.fx import Node

from peftc.ir import adapters
from peftc.ir.graph_edit import provenance
from peftc.ir.shapes import DYNAMIC_MARK, Shape, example_size, node_shape
from peftc.ir.sites import module_path_of

# torch.export's placeholder for "no module": treat it as the top level.
EMPTY_STACK_MARKERS = ("_empty_nn_module_stack_from_metadata_hook",)


def node_module_path(node: Node) -> str:
    """The module a node belongs to; for a parameter read, the module that owns the parameter."""
    path = module_path_of(node)
    if path in EMPTY_STACK_MARKERS:
        path = ""
    if not path and node.op == "get_attr":
        owner = str(node.target).rpartition(".")[0]
        prefix = adapters.ROOT + "."
        path = owner[len(prefix):] if owner.startswith(prefix) else owner
    return path


def node_dtype(node: Node) -> str | None:
    val = node.meta.get("val")
    return str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None


def inserted_by(node: Node) -> str | None:
    """The pass that inserted `node`, or None for a node of the captured graph."""
    tag = provenance(node)
    return None if tag is None else tag.get("pass")


SHORT_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                "bool": "bool", "uint8": "u8", "int8": "i8"}


def format_shape(shape: Shape | None, dtype: str | None = None) -> str:
    """`f32[2*,8*,64]`: the dtype, then the shape with its dynamic dims marked."""
    if shape is None:
        return "-"
    return f"{SHORT_DTYPES.get(dtype, dtype or '')}{shape}"


def value_text(node: Node) -> str:
    """What a node computes: `f32[2*,8*,64]` for a tensor, `2*` for a size read from a dynamic dim."""
    val = node.meta.get("val")
    if isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
        size, dynamic = example_size(val)
        return f"{size}{DYNAMIC_MARK if dynamic else ''}"
    return format_shape(node_shape(node), node_dtype(node))


def op_name(node: Node) -> str:
    if node.op == "call_function" and isinstance(node.target, types.FunctionType):  # a pass's Python op
        return f"{node.target.__module__.removeprefix('peftc.ir.')}.{node.target.__qualname__}"
    if node.op == "call_function":
        return str(node.target).replace("torch.ops.", "")
    return node.op if node.op in ("placeholder", "output") else f"{node.op} {node.target}"


def format_node(node: Node, args: tuple | None = None, kwargs: dict | None = None) -> str:
    """One line: `name = op(args)  f32[2*,8*,64]`, parameters shown by name.

    `args`/`kwargs` replace the node's own: what it read before a pass rewired or erased it.
    """
    args = node.args if args is None else args
    kwargs = node.kwargs if kwargs is None else kwargs
    args = ", ".join([_format_arg(a) for a in args] + [f"{k}={_format_arg(v)}" for k, v in kwargs.items()])
    shape = value_text(node)
    if node.op == "get_attr":  # read by target in the lines that use it, so its node name adds nothing
        return f"param {node.target}  {shape}"
    return f"{node.name} = {op_name(node)}({args})  {shape}"


def _format_arg(arg) -> str:
    if isinstance(arg, Node):
        return str(arg.target) if arg.op == "get_attr" else arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"[{inner}]"
    return repr(arg)

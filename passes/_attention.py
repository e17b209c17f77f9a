"""Attention ops (aten.scaled_dot_product_attention) as prefix passes read and edit them."""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.ir.sites import module_path_of

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False}


def attention_ops(gm: GraphModule) -> list[tuple[Node, str]]:
    """Every attention op in graph order with the path its prefix is stored at: its module path
    (`model.layers.0.self_attn`), made unique with `.attention<i>` when one module has several."""
    found: list[tuple[Node, str]] = []
    for index, node in enumerate(n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA):
        path = module_path_of(node) or f"attention{index}"
        found.append((node, path if path not in {p for _, p in found} else f"{path}.attention{index}"))
    return found


def head_layout(node: Node) -> tuple[int, int, int, int]:
    """(query heads, kv heads, repeats, head dim); repeats > 1 when keys were repeated for GQA (repeat_kv)."""
    key = sdpa_arg(node, 1)
    key_val = key.meta["val"]
    heads, head_dim = int(key_val.shape[1]), int(key_val.shape[3])
    if key.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        source = key.args[0]
        val = source.meta.get("val") if isinstance(source, Node) else None
        if source.target == aten.expand.default and val is not None and val.dim() == 5:
            return heads, int(val.shape[1]), int(val.shape[2]), head_dim
    return heads, heads, 1, head_dim


def sdpa_arg(node: Node, index: int, default=None):
    name = SDPA_ARGS[index]
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if index < len(node.args) else default


def set_sdpa_arg(node: Node, index: int, value) -> None:
    name = SDPA_ARGS[index]
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: value}
        return
    args = list(node.args)
    while len(args) <= index:  # fill the positional gap with sdpa's defaults
        args.append(SDPA_DEFAULTS[SDPA_ARGS[len(args)]])
    args[index] = value
    node.args = tuple(args)

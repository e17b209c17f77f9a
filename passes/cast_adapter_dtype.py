"""cast_adapter_dtype: compute each adapter kept in float32 over a half-precision base in float32.

The insert passes build an adapter's nodes in the base's terms; passes/_per_site.py keeps the
adapter's tensors in `peftc.ir.adapters.adapter_dtype` (float32 over a float16/bfloat16 base,
HF PEFT's autocast_adapter_dtype). This pass makes the graph agree, as PEFT's layers do (they cast
the input to the adapter weights' dtype and the result back to the base output's): every
half-precision base value an adapter's nodes read (the site's input x, its output y, its weight W)
is cast up where the branch reads it, and each output node (y + Δ, W + ΔW, x·l) is cast back to
the dtype of the base value it replaces, so the add happens in float32 and rounds once. The cast
back is tagged role "cast_back" (merge_adapters points its readers back at the base value).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, provenance, refresh_meta
from peftc.pipeline.runner import PassContext, PassResult

aten = torch.ops.aten


def cast_adapter_dtype(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Cast the half-precision base values each promoted adapter reads up, and its outputs back."""
    result = PassResult(modified=False)
    params = {site.path: site.param for site in ctx.sites}
    for group in adapter_groups(gm):
        tag = provenance(group[0])
        param = params.get(tag["site"])
        dtype = _module_dtype(ctx, tag)
        if param is None or dtype is None or ctx.base_params[param].dtype not in adapters.HALF_DTYPES \
                or dtype == ctx.base_params[param].dtype or _casts_itself(group):
            continue
        _cast_group(gm, group, dtype, ctx)
        result.modified = True
        result.sites.append(tag["site"])
    return result


def _casts_itself(group: list[Node]) -> bool:
    """Whether the insert pass already cast what the adapter hands the base (prompt, p-tuning and prefix
    tuning cast their virtual tokens to the base's dtype where they join it, as PEFT does)."""
    return any(provenance(node).get("role") == "cast_back" for node in group)


def adapter_groups(gm: GraphModule) -> list[list[Node]]:
    """The nodes each insert pass added at a site, grouped by (entry, site, slot), in graph order."""
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        tag = provenance(node)
        if tag and tag.get("site") and tag.get("slot") is not None and str(tag.get("pass", "")).startswith("insert_"):
            groups.setdefault((tag["entry"], tag["site"], tag["slot"]), []).append(node)
    return list(groups.values())


def _module_dtype(ctx: PassContext, tag: dict) -> torch.dtype | None:
    """The dtype of the adapter's float tensors: what its branch computes in (after `cm.to(bfloat16)`
    the adapters are bfloat16 too, as PEFT's are, and nothing is cast)."""
    parent = adapters.module_at(ctx.adapter_root, tag["site"], create=False)
    module = None if parent is None else parent._modules.get(tag["slot"])
    floats = [] if module is None else [p for p in module.parameters() if p.is_floating_point()]
    return floats[0].dtype if floats else None


def _cast_group(gm: GraphModule, group: list[Node], dtype: torch.dtype, ctx: PassContext) -> None:
    """Every half-precision value the group's nodes read, cast to `dtype` once (role "cast_up"), each
    output node's value cast back to the dtype of the base value it stands for (role "cast_back")."""
    tag = {k: v for k, v in provenance(group[0]).items() if k != "role"}
    cast_up: dict[Node, Node] = {}
    for node in group:  # in graph order, each node's dtype settled before its readers are looked at
        for arg in node.all_input_nodes:
            # a base value, or one of the branch's own in the base dtype (a buffer shared by the
            # method's sites, a constant made in the weight's dtype when the pass ran)
            if _dtype_of(gm, arg) not in adapters.HALF_DTYPES:
                continue
            if arg not in cast_up:
                cast_up[arg] = _cast(gm, node.prev, node, arg, dtype, {**tag, "role": "cast_up"}, ctx)
            node.replace_input_with(arg, cast_up[arg])
        refresh_meta(gm, [node], ctx.meta_cache)
    for output in [n for n in group if provenance(n).get("role") == "output"]:
        base = output.args[0]
        base = base.args[0] if base in cast_up.values() else base
        back_to = _dtype_of(gm, base)
        if back_to is None or back_to == dtype:
            continue
        users = list(output.users)
        back = _cast(gm, output, output, output, back_to, {**tag, "role": "cast_back"}, ctx)
        for user in users:
            user.replace_input_with(output, back)


def _cast(gm: GraphModule, anchor: Node, site_node: Node, value: Node, dtype: torch.dtype, tag: dict,
          ctx: PassContext) -> Node:
    ins = Inserter(gm, anchor, tag, meta_cache=ctx.meta_cache)
    ins.module_stack = site_node.meta.get("nn_module_stack", ins.module_stack)
    return ins.call(aten._to_copy.default, value, dtype=dtype)


def _dtype_of(gm: GraphModule, node: Node) -> torch.dtype | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    if node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return value.dtype if isinstance(value, torch.Tensor) else None
    return None

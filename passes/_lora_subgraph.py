"""Match the subgraph insert_lora leaves at a linear site: base matmul + s * B(A(dropout?(x))).

The base matmul is an aten linear/addmm/mm/matmul against a float weight, or quantize_base's
peftc::quantized_linear over a packed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from peftc.ir import quantized
from peftc.ir.graph_edit import provenance
from peftc.ir.modes import DROPOUT_OPS
from peftc.ir.sites import Site

aten = torch.ops.aten
BASE_OPS = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default)


@dataclass
class LoraMatch:
    """One base matmul + LoRA branch, ready to become a fused op."""

    site: Site
    tag: dict  # provenance of the LoRA nodes (entry, site, slot)
    output: Node  # add(base, delta, alpha=s): its users get the fused op
    base: Node  # the site's matmul
    x: Node
    x_lora: Node | None  # the dropout node feeding the adapter, if any
    weight: Node | None  # [N, K] float weight (a get_attr); None for a packed one (see `packed`)
    transpose_weight: bool  # weight is [K, N] (GPT-2 Conv1D): the fused op reads its transpose
    bias: Node | None
    a: Node
    b: Node
    scale: float
    erase: list[Node]  # nodes the fused op makes dead
    packed: tuple | None = None  # quantized_linear's (qdata, format, out, in, group_size, compute_dtype)


def lora_groups(gm: GraphModule) -> list[list[Node]]:
    """Nodes insert_lora added, grouped by (entry, site, slot) in graph order."""
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        tag = provenance(node)
        if tag and tag.get("method") == "lora" and tag.get("pass") == "insert_lora":
            groups.setdefault((tag["entry"], tag["site"], tag["slot"]), []).append(node)
    return list(groups.values())


def match_lora(gm: GraphModule, group: list[Node], site: Site, trainable: set[str]) -> LoraMatch | str:
    """A LoraMatch, or the reason this group cannot be fused (a short phrase for the report)."""
    if site.kind != "linear":
        return f"{site.kind} site (only linear sites are fused)"
    output = next((n for n in group if provenance(n).get("role") == "output"), None)
    if output is None or output.target != aten.add.Tensor or len(output.args) != 2:
        return "unexpected LoRA output node"
    base, delta = output.args
    scale = output.kwargs.get("alpha", 1)
    if not isinstance(base, Node) or base.name != site.node_name or base.target not in (*BASE_OPS, quantized.OP):
        return "base op is not the site's matmul (another adapter is stacked on it)"
    if len(base.users) != 1 or base.kwargs:
        return "base matmul has other users or beta/alpha"
    if site.param in trainable:
        return "base weight is trainable (the fused op gives no weight gradient)"
    branch = _branch(delta, scale, group)
    if isinstance(branch, str):
        return branch
    hidden_in, a, b, scale, branch_nodes = branch
    x = base.args[site.input_index]
    x_lora = None
    if hidden_in is not x:
        if hidden_in.target not in DROPOUT_OPS or hidden_in.args[0] is not x:
            return "adapter input is neither the site input nor its dropout"
        x_lora = hidden_in
    common = dict(site=site, tag=provenance(output), output=output, base=base, x=x, x_lora=x_lora, a=a, b=b,
                  scale=scale)
    if base.target == quantized.OP:  # (x, qdata, bias, fmt, out, in, group, compute_dtype)
        return LoraMatch(**common, weight=None, transpose_weight=False, bias=base.args[2],
                         erase=[output, *branch_nodes, base], packed=(base.args[1], *base.args[3:8]))
    weight, transpose, extra = _weight(base, site)
    bias = base.args[0] if base.target == aten.addmm.default else (
        base.args[2] if base.target == aten.linear.default and len(base.args) > 2 else None)
    return LoraMatch(**common, weight=weight, transpose_weight=transpose, bias=bias,
                     erase=[output, *branch_nodes, base, *extra])


def _branch(delta, scale, group: list[Node]):
    """(adapter input, A node, B node, scale, nodes to erase) of add(base, linear(linear(h, A), B), alpha=s)."""
    ok = isinstance(scale, (int, float)) and isinstance(delta, Node) and delta.target == aten.linear.default \
        and len(delta.args) == 2
    hidden = delta.args[0] if ok else None
    ok = ok and isinstance(hidden, Node) and hidden.target == aten.linear.default and len(hidden.args) == 2
    if not ok or not all(n in group for n in (delta, hidden)):
        return "LoRA branch is not add(y, linear(linear(x, A), B), alpha=s)"
    if any(len(n.users) != 1 for n in (delta, hidden)):
        return "LoRA branch values are used elsewhere"
    return hidden.args[0], hidden.args[1], delta.args[1], float(scale), [delta, hidden]


def _weight(base: Node, site: Site) -> tuple[Node, bool, list[Node]]:
    """(weight node as the fused op reads it, whether it is [K, N], transpose nodes made dead)."""
    arg = base.args[site.input_index + 1]
    if base.target == aten.linear.default or site.layout == "in_out":
        return arg, site.layout == "in_out", []
    # mm/addmm/matmul against t(W): read W [N, K] directly; t() dies with the base op if unshared
    return arg.args[0], False, [arg] if len(arg.users) == 1 else []

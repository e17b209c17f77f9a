"""Outline graph regions into submodules: layers found from nn_module_stack, one call per layer.

A *layer* is a module at `<stack>.<index>` (`model.layers.3`, `encoder.layer.0`) whose parent
holds at least two such indices: the outermost numbered children of a ModuleList, read from
the `nn_module_stack` every captured node carries. A layer's region is the span of graph
nodes from its first op to its last, so the nodes a pass inserted without a module stack
(adapter ops) ride along with the layer they sit in. A span is contiguous in the graph's
order, so replacing it by one call can never create a cycle.

`outline(gm, region, name, wrap)` moves a region's ops into a new GraphModule whose inputs
are the values the region reads (parameters included, as plain inputs, last) and whose outputs
are the values the rest of the graph reads; the parent calls the wrapper at `name` instead.
Parameters stay registered on the parent only, so state_dict and named_parameters are unchanged.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from collections import Counter
from dataclasses import dataclass

from torch import nn
from torch.fx import Graph, GraphModule, Node

from peftc.ir.modes import MODE_KEY

LAYER_PATH = re.compile(r"(.+)\.(\d+)")


@dataclass(frozen=True)
class Region:
    path: str  # the layer's module path, e.g. "model.layers.3"
    nodes: tuple[Node, ...]  # in graph order, get_attr nodes excluded (they stay in the parent)


def module_paths(node: Node) -> list[str]:
    """The module paths a node ran in, outermost first."""
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def layer_stacks(gm: GraphModule) -> set[str]:
    """Outermost module paths with at least two numbered children that run ops (`model.layers`)."""
    indices: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        for path in module_paths(node):
            match = LAYER_PATH.fullmatch(path)
            if match:
                indices.setdefault(match.group(1), set()).add(match.group(2))
    stacks = {path for path, seen in indices.items() if len(seen) >= 2}
    return {s for s in stacks if not any(s != other and s.startswith(other + ".") for other in stacks)}


def layer_of(node: Node, stacks: set[str]) -> str | None:
    for path in module_paths(node):
        match = LAYER_PATH.fullmatch(path)
        if match and match.group(1) in stacks:
            return path
    return None


def layer_regions(gm: GraphModule) -> list[Region]:
    """One region per layer, in graph order; a layer whose ops are interleaved with another's has none."""
    stacks = layer_stacks(gm)
    order = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    spans: dict[str, list[int]] = {}
    for i, node in enumerate(order):
        layer = layer_of(node, stacks)
        if layer is not None:
            spans.setdefault(layer, [i, i])[1] = i
    regions = []
    for path, (first, last) in sorted(spans.items(), key=lambda item: item[1][0]):
        nodes = _without_foreign_calls(order[first:last + 1])
        if nodes and all(layer_of(n, stacks) in (path, None) for n in nodes):
            regions.append(Region(path, tuple(nodes)))
    return regions


def _without_foreign_calls(nodes: list[Node]) -> list[Node] | None:
    """The span without the module calls that landed in it (torch.export's input guards, `_guards_fn`),
    moved before it; None if one of them reads a value the span computes."""
    span = set(nodes)
    calls = [n for n in nodes if n.op == "call_module"]
    if any(value in span for call in calls for value in call.all_input_nodes):
        return None
    for call in calls:
        nodes[0].prepend(call)
    return [n for n in nodes if n.op != "call_module"]


def is_attribute(node: Node) -> bool:
    return node.op == "get_attr"


def outline(gm: GraphModule, region: Region, name: str, wrap: Callable[[GraphModule, int], nn.Module],
            trailing: Callable[[Node], bool] = is_attribute) -> nn.Module:
    """Replace `region` by a call to `wrap(body, num_trailing)`, registered on `gm` as `name`.

    The body's inputs are the values the region reads, those `trailing` picks (by default the
    parameters and buffers) last, so a wrapper can tell them from the rest. Returns the wrapper.
    """
    inputs = region_inputs(region)
    inputs = [n for n in inputs if not trailing(n)] + [n for n in inputs if trailing(n)]
    outputs = region_outputs(region)
    body = GraphModule(nn.Module(), body_graph(region.nodes, inputs, outputs), class_name="LayerBody")
    module = wrap(body, sum(1 for n in inputs if trailing(n)))
    gm.add_submodule(name, module)
    for value in inputs:  # attribute reads a pass placed inside the span must come before the call
        if value.op == "get_attr":
            region.nodes[0].prepend(value)
    replace_with_call(gm, region, name, inputs, outputs)
    return module


def replace_with_call(gm: GraphModule, region: Region, name: str, inputs: list[Node], outputs: list[Node],
                      kwargs: dict | None = None) -> Node:
    """Put `gm.<name>(*inputs, **kwargs)` where `region` was; its i-th result stands for `outputs[i]`."""
    inside = set(region.nodes)
    with gm.graph.inserting_before(region.nodes[0]):
        call = gm.graph.call_module(name, tuple(inputs), kwargs or {})
        call.meta["nn_module_stack"] = region.nodes[0].meta.get("nn_module_stack", {})
        for i, node in enumerate(outputs):
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta = value_meta(node)
            node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    return call


def region_inputs(region: Region) -> list[Node]:
    """The nodes outside `region` that its nodes read, in first-use order."""
    inside = set(region.nodes)
    seen: dict[Node, None] = {}
    for node in region.nodes:
        for value in node.all_input_nodes:
            if value not in inside:
                seen.setdefault(value, None)
    return list(seen)


def region_outputs(region: Region) -> list[Node]:
    """The nodes of `region` that nodes outside it read, in graph order."""
    inside = set(region.nodes)
    return [n for n in region.nodes if any(user not in inside for user in n.users)]


def body_graph(nodes: tuple[Node, ...], inputs: list[Node], outputs: list[Node],
               reads_inside: dict[Node, str] | None = None) -> Graph:
    """A graph of `nodes` taking `inputs` as placeholders and returning `outputs` as a tuple.

    `reads_inside` maps attribute reads (get_attr nodes outside the region) to the target the
    body reads itself instead of taking them as inputs.
    """
    graph = Graph()
    env: dict[Node, Node] = {}
    names: set[str] = set()
    for value in inputs:
        env[value] = graph.placeholder(_unique(_placeholder_name(value), names))
        env[value].meta = value_meta(value)
    for value, target in (reads_inside or {}).items():
        env[value] = graph.get_attr(target)
        env[value].meta = dict(value.meta)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    return graph


def value_meta(node: Node) -> dict:
    """`node`'s metadata for a node standing for its value (a placeholder, a getitem), not its op:
    those have no train/eval argument to switch."""
    return {k: v for k, v in node.meta.items() if k != MODE_KEY}


def _unique(name: str, used: set[str]) -> str:
    """`name`, or `name_1`, `name_2`...: placeholder names are the code's argument names (two reads of one
    attribute must not give two arguments of one name)."""
    candidate, n = name, 0
    while candidate in used:
        n += 1
        candidate = f"{name}_{n}"
    used.add(candidate)
    return candidate


def _placeholder_name(node: Node) -> str:
    return str(node.target).replace(".", "_") if node.op == "get_attr" else node.name


def read_by_several(regions: list[Region]) -> set[Node]:
    """Values more than one layer reads (attention mask, rotary cos/sin): alive until the last layer
    anyway, so a checkpointed layer holds a reference instead of saving its own copy for backward."""
    counts = Counter(node for region in regions for node in region_inputs(region))
    return {node for node, count in counts.items() if count > 1}


def mutates(region: Region) -> bool:
    """Whether the region updates a tensor in place (batch-norm statistics): recomputing it in backward
    would apply the update twice, so checkpointing skips it."""
    for node in region.nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.is_mutable:
            return True
    return False

"""structure_layers: the layer-structured form of a graph — one call per layer, at the layer's own path.

The passes rewrite one flat graph (every op inline, parameters as `get_attr`). That form is
what inspection, merging and export read, and it stays as it is. This lowering builds a
second graph over the *same* module tree: each layer of a stack (peftc.ir.outline finds
them from `nn_module_stack`) becomes a `CompiledLayer` at its own path holding its own base
parameters, and the top graph calls it once per layer (peftc.ir.layer_program). Layers
whose outlined graphs have the same structure share one LayerProgram: one code object, and
with the inductor back end one compiled graph, for the whole stack.

A graph without a stack of at least two layers is returned as it is.
"""

from __future__ import annotations

import copy
import hashlib
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate

from peftc.ir.layer_program import CompiledLayer, LayerProgram
from peftc.ir.outline import (
    Region,
    body_graph,
    layer_regions,
    layer_stacks,
    mutates,
    read_by_several,
    region_inputs,
    region_outputs,
    replace_with_call,
)


def structure_layers(flat: GraphModule, checkpointed: bool = False, compiled: bool = False) -> GraphModule:
    """The layer-structured twin of `flat` (sharing its module tree), or `flat` if it has no layer stack.

    `checkpointed` turns activation checkpointing on in every layer; `compiled` runs each distinct
    layer program through torch.compile (Inductor) once, for every layer that uses it.
    """
    top = twin(flat, copy.deepcopy(flat.graph))
    regions = layer_regions(top)
    if len(regions) < 2:
        return flat
    shared = read_by_several(regions)
    programs: dict[str, LayerProgram] = {}
    for region in regions:
        layer = _install_layer(top, region.path)
        if layer is None:  # a layer without tensors of its own (a dropout in a ModuleList): left inline
            continue
        program = _outline_layer(top, region, layer, shared, programs, compiled)
        layer.add_programs({program.key: program})
        layer.checkpointed = checkpointed
    _stacks_as_module_lists(top)
    top.graph.lint()
    top.recompile()
    return top


def twin(gm: GraphModule, graph: Graph) -> GraphModule:
    """A graph module running `graph` over `gm`'s state: the same module tree, tensors, export
    metadata and input checks (its dicts are `gm`'s own), with a class of its own for the code."""
    impl = next(t for t in type(gm).__mro__ if t.__qualname__.split(".")[-1] != "GraphModuleImpl")
    twin_module = impl.__new__(impl)  # GraphModule.__new__ gives each instance its own class
    twin_module.__dict__.update(gm.__dict__)
    twin_module.meta = dict(gm.meta)
    twin_module.graph = graph  # sets graph.owning_module and generates the code
    return twin_module


def program_key(graph: Graph, num_held: int) -> str:
    """A name for the graph's structure: equal for two layers exactly when their code is the same."""
    index: dict[Node, int] = {}
    parts = [str(num_held)]
    for i, node in enumerate(graph.nodes):
        index[node] = i
        target = "" if node.op == "placeholder" else node.target if isinstance(node.target, str) else _qualname(node.target)
        operands = map_aggregate((node.args, node.kwargs), lambda a: ("%", index[a]) if isinstance(a, Node) else a)
        parts.append(repr((node.op, target, operands)))
    return "p" + hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


def _qualname(target) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}:{target!r}"


def _install_layer(top: GraphModule, path: str) -> CompiledLayer | None:
    """Put a CompiledLayer at `path` in the shared tree, adopting the captured layer's tensors (None if
    the tree has no module there: the layer holds no tensor)."""
    parent_path, _, name = path.rpartition(".")
    parent = top.get_submodule(parent_path)
    current = parent._modules.get(name)
    if current is None:
        return None
    if isinstance(current, CompiledLayer):
        return current
    layer = CompiledLayer(path, current)
    parent._modules[name] = layer
    return layer


def _outline_layer(top: GraphModule, region: Region, layer: CompiledLayer, shared: set[Node],
                   programs: dict[str, LayerProgram], compiled: bool) -> LayerProgram:
    prefix = region.path + "."
    reads_inside = {n: n.target[len(prefix):] for n in region_inputs(region)
                    if n.op == "get_attr" and n.target.startswith(prefix)}
    outside = [n for n in region_inputs(region) if n not in reads_inside]
    held = [n for n in outside if n.op == "get_attr" or n in shared]
    inputs = [n for n in outside if n not in held] + held
    outputs = region_outputs(region)
    body = body_graph(region.nodes, inputs, outputs, reads_inside)
    key = program_key(body, len(held))
    program = programs.get(key)
    if program is None:
        program = programs[key] = LayerProgram(key, _code_only(layer, body, region), len(held), compiled,
                                               recomputable=not mutates(region))
    for value in held:  # attribute reads a pass placed inside the span must come before the call
        if value.op == "get_attr":
            region.nodes[0].prepend(value)
    replace_with_call(top, region, region.path, inputs, outputs, {"program": key})
    for value in reads_inside:
        if not value.users:
            top.graph.erase_node(value)
    return program


def _code_only(layer: CompiledLayer, body: Graph, region: Region) -> GraphModule:
    """A GraphModule for `body`'s generated code, holding no tensors (they stay on the layers)."""
    kind = _layer_class_name(region)
    code = GraphModule(layer, body, class_name=f"{kind}Program")
    code._modules.clear()
    code._parameters.clear()
    code._buffers.clear()
    return code


def _layer_class_name(region: Region) -> str:
    for path, kind in (region.nodes[0].meta.get("nn_module_stack") or {}).values():
        if path == region.path:
            return (kind if isinstance(kind, str) else kind.__name__).rpartition(".")[2]
    return "Layer"



def _stacks_as_module_lists(top: GraphModule) -> None:
    """`model.layers` as an nn.ModuleList when all its children are layers 0..n-1, as in the original
    model: `for layer in cm.model.layers: fully_shard(layer)` iterates it."""
    for path in layer_stacks(top):
        stack = top.get_submodule(path)
        children = stack._modules
        if isinstance(stack, nn.ModuleList) or list(children) != [str(i) for i in range(len(children))]:
            continue
        if not all(isinstance(child, CompiledLayer) for child in children.values()):
            continue
        parent_path, _, name = path.rpartition(".")
        top.get_submodule(parent_path)._modules[name] = nn.ModuleList(list(children.values()))

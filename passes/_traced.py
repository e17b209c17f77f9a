"""Inline an adapter module's torch code into a captured graph as the aten ops it runs.

Methods whose update is a longer computation (a Cayley transform, a chain of Householder
reflections, a sparse scatter) write it once, as the adapter module's `forward`. The pass
traces that forward with `make_fx` (fake tensors: nothing is computed) and copies the traced
aten nodes to the site, with the graph's own nodes for the module's tensors; merging calls
the same forward eagerly, so the folded weight is the graph's computation by construction.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.node import map_arg

from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext


def inline_module(ins: Inserter, ctx: PassContext, site: Site, module: nn.Module, inputs: Sequence[Node],
                  examples: Sequence[torch.Tensor]) -> Node:
    """The node computing `module(*inputs)`: its traced aten ops, inserted with `ins`.

    `inputs` are graph nodes and `examples` tensors of their shapes and dtypes; the module's
    parameters and buffers are read from the adapter tree. Traces are cached per graph by
    module type, config and shapes, as repeated layers trace the same code.
    """
    names = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
    tensors = [t.detach() for t in list(module.parameters()) + list(module.buffers())]
    key = (type(module).__name__, ctx.entry, tuple((tuple(t.shape), t.dtype) for t in [*examples, *tensors]))
    cache = ctx.meta_cache.setdefault("traced modules", {})  # per graph, beside the Inserter's metadata
    if key not in cache:
        cache[key] = _trace(module, names, len(examples), [*examples, *tensors])
    attrs = [ins.get_attr(adapters.target(site.path, ctx.slot, name)) for name in names]
    return _copy_nodes(ins, cache[key], [*inputs, *attrs])


def _trace(module: nn.Module, names: list[str], n_inputs: int, examples: list[torch.Tensor]) -> GraphModule:
    def run(*args):
        return functional_call(module, dict(zip(names, args[n_inputs:])), tuple(args[:n_inputs]))

    traced = make_fx(run, tracing_mode="fake")(*examples)
    constants = [n.target for n in traced.graph.nodes if n.op == "get_attr"]
    if constants:  # a tensor made from Python data: it would need a home on the graph module
        raise RuntimeError(f"{type(module).__name__}.forward creates tensor constants {constants}; "
                           "derive them from its inputs instead")
    return traced


def _copy_nodes(ins: Inserter, traced: GraphModule, inputs: list[Node]) -> Node:
    env: dict[Node, Node] = {}
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, inputs))
    for node in traced.graph.nodes:
        if node.op == "call_function":
            args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = ins.call(node.target, *args, **kwargs)
        elif node.op == "output":
            return map_arg(node.args[0], env.__getitem__)
    raise RuntimeError("traced graph has no output")

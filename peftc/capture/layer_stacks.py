"""Capture a stack of identical layers once: export two layers, copy the second for the rest.

torch.export pays for every op it traces (with symbolic batch/sequence dims, ~8 ms per op on
a LLaMA-7B-sized layer on a 2-core CPU), and a transformer's decoder layers are identical
modules run one after another. When every layer of a `ModuleList` has the same class, the
same parameter names, shapes and dtypes and the same settings (all attributes equal except
the layer index), peftc exports the model with that list cut to its first two layers, checks
that the two traced layers are the same graph (ops, constants, module structure), and writes
layer k >= 2 as a copy of layer 1 that reads layer k's weights and layer k-1's outputs.
Whatever it cannot prove raises `NotCopyable`, and capture then exports every layer.
Assumed, not provable without the full trace: a layer reads its index only in ways layers 0
and 1 already show (a stored setting, a constant), and the model runs the stack as a chain
whose last outputs are what follows reads. `peftc.compile(..., copy_layers=False)` opts out.

Outputs recorded per layer (transformers' `output_hidden_states` / `output_attentions`: a hook
on every layer appends its value to a tuple) show in the two-layer graph as a value of layer 0
followed, in the same output tuple, by the same value of layer 1; the full graph's tuple holds
that value of every layer in order (peftc.capture.recorded_outputs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate

from peftc.capture import recorded_outputs

MIN_LAYERS = 3  # with fewer, exporting every layer costs no more than two
INDEX_ATTRS = frozenset({"layer_idx", "layer_index", "layer_id", "layer_number"})


class NotCopyable(Exception):
    """The traced layers cannot stand for the others; capture exports every layer instead."""


@dataclass(frozen=True)
class Stack:
    path: str  # FQN of the ModuleList, e.g. "model.layers"
    layers: tuple[nn.Module, ...]

    def layer_path(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_stacks(model: nn.Module) -> list[Stack]:
    """Outermost ModuleLists of >= MIN_LAYERS distinct layers that are alike (see `_signature`)."""
    stacks: list[Stack] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s.path + ".") for s in stacks):
            continue
        if isinstance(module, nn.ModuleList) and len(module) >= MIN_LAYERS and _alike(list(module)):
            stacks.append(Stack(name, tuple(module)))
    return stacks


def _alike(layers: list[nn.Module]) -> bool:
    if len({id(layer) for layer in layers}) != len(layers):
        return False
    param_ids = [id(p) for layer in layers for _, p in layer.named_parameters(remove_duplicate=False)]
    if len(set(param_ids)) != len(param_ids):  # weights shared across layers: not a plain stack
        return False
    first = _signature(layers[0])
    return first is not None and all(_signature(layer) == first for layer in layers[1:])


def _signature(layer: nn.Module) -> tuple | None:
    """What a layer's graph can depend on, besides its index; None if it has hooks (other than
    transformers' output recording, which every layer of a class has alike: recorded_outputs)."""
    parts = []
    for name, module in layer.named_modules(remove_duplicate=False):
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values(),
                 *module._backward_hooks.values(), *module._backward_pre_hooks.values()]
        if not all(recorded_outputs.is_recording_hook(hook) for hook in hooks):
            return None
        tensors = [(n, _tensor_key(t)) for n, t in {**module._parameters, **module._buffers}.items()]
        persistent = tuple(sorted(set(module._buffers) - module._non_persistent_buffers_set))
        parts.append((name, type(module), tuple(tensors), persistent, _Settings(module)))
    return tuple(parts)


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    if t is None:
        return None
    return type(t), tuple(t.shape), t.dtype, t.device, t.requires_grad


class _Settings:
    """A module's plain attributes, equal when every value is equal (or the very same object)."""

    def __init__(self, module: nn.Module):
        self.items = {k: v for k, v in vars(module).items()
                      if not k.startswith("_") and k != "training" and k not in INDEX_ATTRS}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Settings) or self.items.keys() != other.items.keys():
            return False
        return all(_same(v, other.items[k]) for k, v in self.items.items())

    __hash__ = None


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b) or isinstance(a, torch.Tensor):
        return False  # unregistered tensors only match when shared
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001  any attribute's == may raise anything; then they differ
        return False


@contextlib.contextmanager
def cut_to_two(model: nn.Module, stacks: list[Stack]) -> Iterator[None]:
    """Temporarily replace each stack's ModuleList by one holding its first two layers."""
    saved = []
    try:
        for stack in stacks:
            parent_path, _, name = stack.path.rpartition(".")
            parent = model.get_submodule(parent_path)
            saved.append((parent, name, parent._modules[name]))
            parent._modules[name] = nn.ModuleList(stack.layers[:2])
        yield
    finally:
        for parent, name, original in reversed(saved):
            parent._modules[name] = original


def copy_layers(gm: GraphModule, stacks: list[Stack]) -> None:
    """Grow `gm`, exported with every stack cut to two layers, back to the full depth."""
    for stack in stacks:
        _copy_stack(gm, stack)
    gm.graph.lint()
    gm.recompile()


def _copy_stack(gm: GraphModule, stack: Stack) -> None:
    graph = gm.graph
    _check_cut(graph, stack)
    first, second = _segment(graph, stack, 0), _segment(graph, stack, 1)
    _check_contiguous(graph, stack, first, second)
    attrs = _layer_attrs(graph, stack)
    inputs = _per_layer_inputs(graph, stack)
    _check_same_graph(first, second, attrs, inputs)
    layers = [second]
    for index in range(2, len(stack.layers)):
        layers.append(_append_layer(gm, stack, index, first, second, layers[-1], attrs[1], inputs))
    runs = recorded_outputs.find_runs(gm, first, second)
    if runs is None:
        raise NotCopyable(f"an output reads {stack.layer_path(0)} but is not recorded per layer")
    _redirect_later_uses(first, layers, skip=graph.output_node() if runs else None)
    if runs:
        recorded_outputs.grow_runs(gm, runs, [first, *layers])


def _layer_of(node: Node, stack: Stack) -> int | None:
    """Which layer of `stack` the node ran in, from its nn_module_stack."""
    prefix = stack.path + "."
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path.startswith(prefix):
            head = path[len(prefix):].split(".", 1)[0]
            return int(head) if head.isdigit() else None
    return None


def _segment(graph: Graph, stack: Stack, index: int) -> list[Node]:
    nodes = [n for n in graph.nodes if n.op == "call_function" and _layer_of(n, stack) == index]
    if not nodes:
        raise NotCopyable(f"no ops of {stack.layer_path(index)} in the graph")
    return nodes


def _check_cut(graph: Graph, stack: Stack) -> None:
    """Only layers 0 and 1 may have run (the model could reach the others another way)."""
    if any((_layer_of(n, stack) or 0) >= 2 for n in graph.nodes):
        raise NotCopyable(f"layers after {stack.layer_path(1)} ran although the stack was cut")


def _check_contiguous(graph: Graph, stack: Stack, first: list[Node], second: list[Node]) -> None:
    order = {n: i for i, n in enumerate(graph.nodes)}
    span = [n for n in graph.nodes if order[first[0]] <= order[n] <= order[second[-1]]]
    if span != first + second:
        raise NotCopyable(f"the ops of {stack.layer_path(0)} and {stack.layer_path(1)} are interleaved")


def _layer_attrs(graph: Graph, stack: Stack) -> list[dict[Node, str]]:
    """get_attr nodes of layers 0 and 1: node -> name inside the layer."""
    attrs: list[dict[Node, str]] = [{}, {}]
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        for index in (0, 1):
            prefix = stack.layer_path(index) + "."
            if str(node.target).startswith(prefix):
                attrs[index][node] = str(node.target)[len(prefix):]
    return attrs


def _per_layer_inputs(graph: Graph, stack: Stack) -> list[tuple[Node, ...]]:
    """Graph inputs given one per layer: a list input of as many tensors as the stack has layers, flattened
    to `{name}_0` ... `{name}_{L-1}` (a KV cache's past keys: peftc.runtime.tensor_cache). Layer 0 reads
    the first where layer 1 reads the second; layer k's copy reads the k-th."""
    groups: dict[str, dict[int, Node]] = {}
    for node in graph.nodes:
        base, _, index = node.name.rpartition("_")
        if node.op == "placeholder" and base and index.isdigit():
            groups.setdefault(base, {})[int(index)] = node
    count = len(stack.layers)
    return [tuple(group[i] for i in range(count)) for group in groups.values() if sorted(group) == list(range(count))]


def _check_same_graph(first: list[Node], second: list[Node], attrs: list[dict[Node, str]],
                      inputs: list[tuple[Node, ...]]) -> None:
    """Layer 1 must be layer 0 op for op: same targets, constants, and inputs up to renaming."""
    if len(first) != len(second):
        raise NotCopyable(f"the two traced layers have {len(first)} and {len(second)} ops")
    index0 = {n: i for i, n in enumerate(first)}
    index1 = {n: i for i, n in enumerate(second)}
    carried: dict[Node, Node] = {}  # what layer 0 reads from before the stack -> what layer 1 reads instead
    carried.update({group[0]: group[1] for group in inputs})  # a per-layer input: layer 1 reads its own
    for a, b in zip(first, second):
        if a.target != b.target or a.kwargs.keys() != b.kwargs.keys() or _module_types(a) != _module_types(b):
            raise NotCopyable(f"op {a.name} of layer 0 and {b.name} of layer 1 differ")
        leaves_a, leaves_b = _leaves((a.args, a.kwargs)), _leaves((b.args, b.kwargs))
        if len(leaves_a) != len(leaves_b):
            raise NotCopyable(f"ops {a.name} and {b.name} take different arguments")
        for x, y in zip(leaves_a, leaves_b):
            if not _same_input(x, y, index0, index1, attrs, carried):
                raise NotCopyable(f"op {a.name} of layer 0 and {b.name} of layer 1 take different inputs")


def _module_types(node: Node) -> tuple:
    return tuple(t for _, t in (node.meta.get("nn_module_stack") or {}).values())


def _leaves(value: Any) -> list:
    out: list = []
    map_aggregate(value, out.append)
    return out


def _same_input(x: Any, y: Any, index0: dict, index1: dict, attrs: list[dict], carried: dict) -> bool:
    if not isinstance(x, Node) or not isinstance(y, Node):
        return type(x) is type(y) and _same(x, y)
    if x in index0:  # layer 0's own value: layer 1 must use its own value at the same position
        return index1.get(y) == index0[x]
    if x in attrs[0]:
        return attrs[1].get(y) == attrs[0][x]
    if y in index0:  # layer 0 reads x from before the stack, layer 1 reads layer 0's output
        return carried.setdefault(x, y) is y
    if x in carried:  # a per-layer input (_per_layer_inputs)
        return carried[x] is y
    return x is y  # shared input (position ids, masks, rotary tables)


def _append_layer(gm: GraphModule, stack: Stack, index: int, first: list[Node], second: list[Node],
                  previous: list[Node], attrs: dict[Node, str], inputs: list[tuple[Node, ...]]) -> list[Node]:
    """Copy layer 1 as layer `index`, reading its weights, its per-layer inputs and layer index-1's outputs."""
    graph = gm.graph
    position = {n: i for i, n in enumerate(second)}
    from_first = {n: i for i, n in enumerate(first)}
    env: dict[Node, Node] = {group[1]: group[index] for group in inputs}
    with graph.inserting_before(previous[-1].next):
        for node, name in attrs.items():
            env[node] = graph.get_attr(_register(gm, stack, index, name))
            env[node].meta = dict(node.meta)
        copies: list[Node] = []
        for node in second:
            copy = graph.node_copy(node, lambda n: _resolve(n, env, position, from_first, previous, copies))
            copy.meta["nn_module_stack"] = _renamed_stack(node, stack, index)
            copies.append(copy)
    return copies


def _resolve(node: Node, env: dict, position: dict, from_first: dict, previous: list[Node], copies: list[Node]) -> Node:
    if node in env:
        return env[node]
    if node in position:
        return copies[position[node]]
    if node in from_first:
        return previous[from_first[node]]
    return node


def _renamed_stack(node: Node, stack: Stack, index: int) -> dict:
    old, new = stack.layer_path(1), stack.layer_path(index)

    def rename(path: str) -> str:
        return new + path[len(old):] if path == old or path.startswith(old + ".") else path

    renamed = {}
    for key, (path, cls) in node.meta["nn_module_stack"].items():
        new_path = rename(path)
        renamed[key.replace(path, new_path) if path and new_path != path else key] = (new_path, cls)
    return renamed


def _register(gm: GraphModule, stack: Stack, index: int, name: str) -> str:
    """Put layer `index`'s tensor `name` on gm at its FQN (the user's tensor, not a copy)."""
    layer = stack.layers[index]
    owner_path, _, leaf = name.rpartition(".")
    owner = layer.get_submodule(owner_path)
    tensor = getattr(owner, leaf)
    target = f"{stack.layer_path(index)}.{name}"
    parent = gm
    for part in target.split(".")[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    if isinstance(tensor, nn.Parameter):
        parent.register_parameter(leaf, tensor)
    else:
        parent.register_buffer(leaf, tensor, persistent=leaf not in owner._non_persistent_buffers_set)
    return target


def _redirect_later_uses(first: list[Node], layers: list[list[Node]], skip: Node | None = None) -> None:
    """Ops after the stack read the last layer's outputs; none may read layer 0's. `skip` (the output
    node, when it holds per-layer recorded values) is rewritten by recorded_outputs.grow_runs instead."""
    second, last = layers[0], layers[-1]
    inside = set(first).union(*layers)
    if skip is not None:
        inside.add(skip)
    for node in first:
        if any(user not in inside for user in node.users):
            raise NotCopyable(f"{node.name} of layer 0 is used after the stack")
    for i, node in enumerate(second):
        for user in list(node.users):
            if user not in inside:
                user.replace_input_with(node, last[i])

"""Outputs a transformers model records once per layer, grown from a two-layer capture to the full depth.

With `output_hidden_states=True` (or `output_attentions=True`) transformers hooks every decoder
layer and appends a value of each call to a tuple of the output (`hidden_states`: the first
layer's input, then each layer's output, the last one replaced by the final norm's; `attentions`:
each layer's weights). peftc.capture.layer_stacks captures a stack cut to two layers, where such a
tuple holds layer 0's value followed by the same value of layer 1 (the same op at the same position
of each layer's ops). With the stack grown back, that pair becomes that value of every layer, in
order; the output's pytree spec grows with it. An output that reads layer 0's value any other way
cannot be grown (find_runs returns None) and the capture exports every layer instead.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

RECORDING_HOOKS_MODULE = "transformers.utils.output_capturing"
RECORDED_FIELDS = ("hidden_states", "attentions")  # output fields (name endings) transformers fills per layer


def is_recording_hook(hook) -> bool:
    """A forward hook transformers installs to record outputs (inert unless a call asks for them)."""
    return getattr(hook, "__module__", None) == RECORDING_HOOKS_MODULE


def find_runs(gm: GraphModule, first: list[Node], second: list[Node]) -> list[tuple[int, int]] | None:
    """(flat output index, op position in the layer) of each layer-0 value followed by its layer-1 twin
    inside a recorded field's tuple; None if the output reads a layer-0 value in any other way."""
    leaves = _output_leaves(gm)
    position0 = {node: i for i, node in enumerate(first)}
    recorded = _recorded_tuple_slots(gm)
    runs = []
    for index, leaf in enumerate(leaves):
        if leaf not in position0:
            continue
        position = position0[leaf]
        pair_ok = index + 1 < len(leaves) and leaves[index + 1] is second[position]
        if not pair_ok or recorded.get(index) is None or recorded.get(index) != recorded.get(index + 1):
            return None
        runs.append((index, position))
    return runs


def grow_runs(gm: GraphModule, runs: list[tuple[int, int]], layers: list[list[Node]]) -> None:
    """Write every layer's value in place of each run's pair, and the output spec to match; the output's
    other reads of layer 1 become reads of the last layer (as for every op after the stack)."""
    leaves = _output_leaves(gm)
    second, last = layers[1], layers[-1]
    position1 = {node: i for i, node in enumerate(second)}
    starts = dict(runs)
    grown: list = []
    widths: list[int] = []  # how many leaves each old leaf becomes
    index = 0
    while index < len(leaves):
        if index in starts:  # the pair (layers 0 and 1) becomes layers 0..L-1: L-1 leaves, then one
            grown.extend(layer[starts[index]] for layer in layers)
            widths += [len(layers) - 1, 1]
            index += 2
            continue
        leaf = leaves[index]
        grown.append(last[position1[leaf]] if isinstance(leaf, Node) and leaf in position1 else leaf)
        widths.append(1)
        index += 1
    output = gm.graph.output_node()
    output.args = (type(output.args[0])(grown),)
    info = gm.graph._codegen.pytree_info
    out_spec = _grow_spec(info.out_spec, iter(widths))
    gm.graph._codegen.pytree_info = info._replace(out_spec=out_spec)
    gm._out_spec = out_spec


def _output_leaves(gm: GraphModule) -> list:
    value = gm.graph.output_node().args[0]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _recorded_tuple_slots(gm: GraphModule) -> dict[int, int]:
    """Flat output index -> an id of the tuple it sits in, for the leaves directly inside a tuple that a
    recorded field holds (`hidden_states`, `vision_hidden_states`, `attentions`, ...)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    slots: dict[int, int] = {}
    if info is None or info.out_spec is None:
        return slots
    counter = iter(range(1 << 30))

    def walk(spec: pytree.TreeSpec, start: int, field: str | None) -> None:
        keyed = isinstance(spec.context, (list, tuple)) and all(isinstance(k, str) for k in spec.context)
        if spec.type is tuple and field is not None and field.endswith(RECORDED_FIELDS):
            tuple_id = next(counter)
            offset = start
            for child in spec.children():
                if child.is_leaf():
                    slots[offset] = tuple_id
                offset += child.num_leaves
            return
        offset = start
        for index, child in enumerate(spec.children()):
            walk(child, offset, spec.context[index] if keyed else field)
            offset += child.num_leaves

    walk(info.out_spec, 0, None)
    return slots


def _grow_spec(spec: pytree.TreeSpec, widths) -> pytree.TreeSpec:
    """`spec` with each leaf replaced by as many leaves as `widths` says (in flat order)."""
    if spec.is_leaf():
        return spec  # only reached at the top level: a single output leaf is never a run
    children = []
    for child in spec.children():
        if child.is_leaf():
            children.extend(pytree.treespec_leaf() for _ in range(next(widths)))
        else:
            children.append(_grow_spec(child, widths))
    if spec.type is not tuple and len(children) != spec.num_children:
        raise ValueError("only a tuple's leaves can grow")
    return pytree.TreeSpec(spec.type, spec.context, children)

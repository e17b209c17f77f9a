"""Outputs a transformers model records once per layer, grown from a two-layer capture to the full depth.

With `output_hidden_states=True` (or `output_attentions=True`) transformers hooks every decoder
layer and appends a value of each call to a tuple of the output (`hidden_states`: the first
layer's input, then each layer's output, the last one replaced by the final norm's when the model
ties it; `attentions`: each layer's weights). peftc.capture.layer_stacks captures a stack cut to
two layers, where such a tuple holds a value of layer 0 (an op at some position of its ops)
either followed by the same value of layer 1 (the op at the same position of layer 1's ops) or
not (layer 1's was replaced by the final norm's). With the stack grown back to L layers, the pair
becomes that value of layers 0..L-1 and the single value that of layers 0..L-2, in order; the
output's pytree spec grows with it. Only leaves directly inside a recorded field's tuple are
grown; an output that reads layer 0's value any other way cannot be (find_runs returns None) and
the capture exports every layer instead.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

RECORDING_HOOKS_MODULE = "transformers.utils.output_capturing"
# output fields (name endings) filled per layer: transformers' recorded outputs, and the keys and values
# a cached-forward graph returns (peftc.runtime.tensor_cache)
RECORDED_FIELDS = ("hidden_states", "attentions", "cache_keys", "cache_values")


def is_recording_hook(hook) -> bool:
    """A forward hook transformers installs to record outputs (inert unless a call asks for them)."""
    return getattr(hook, "__module__", None) == RECORDING_HOOKS_MODULE


def find_runs(gm: GraphModule, first: list[Node], second: list[Node]) -> list[tuple[int, int, bool]] | None:
    """(flat output index, op position in the layer, whether layer 1's twin follows) of each layer-0
    value inside a recorded field's tuple; None if the output reads a layer-0 value in any other way."""
    leaves = _output_leaves(gm)
    position0 = {node: i for i, node in enumerate(first)}
    recorded = _recorded_tuple_slots(gm)
    runs = []
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, Node) or leaf not in position0:
            continue
        if recorded.get(index) is None:
            return None
        position = position0[leaf]
        paired = index + 1 < len(leaves) and leaves[index + 1] is second[position] \
            and recorded.get(index + 1) == recorded[index]
        runs.append((index, position, paired))
    return runs


def grow_runs(gm: GraphModule, runs: list[tuple[int, int, bool]], layers: list[list[Node]]) -> None:
    """Write every layer's value in place of each run's pair, and the output spec to match; the output's
    other reads of layer 1 become reads of the last layer (as for every op after the stack)."""
    leaves = _output_leaves(gm)
    second, last = layers[1], layers[-1]
    position1 = {node: i for i, node in enumerate(second)}
    starts = {index: (position, paired) for index, position, paired in runs}
    grown: list = []
    widths: list[int] = []  # how many leaves each old leaf becomes
    index = 0
    while index < len(leaves):
        if index in starts:  # a pair becomes layers 0..L-1 (L-1 leaves, then one); a single, layers 0..L-2
            position, paired = starts[index]
            grown.extend(layer[position] for layer in (layers if paired else layers[:-1]))
            widths += [len(layers) - 1, 1] if paired else [len(layers) - 1]
            index += 2 if paired else 1
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

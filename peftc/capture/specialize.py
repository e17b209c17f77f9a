"""Derive the graph of a call that passes fewer optional inputs from a captured graph, without export.

torch.export specializes a graph on the arguments a call passes, so every new combination
(labels or not, output_hidden_states or not) used to cost a whole capture. A graph captured
with more optional inputs already holds the computation of any call that passes fewer:
`labels` only switch on the `loss` output, `output_hidden_states=True` only switches on the
`*hidden_states` outputs, `num_items_in_batch` only scales the loss. So the graph of the call
without them is the captured graph with those outputs removed, the code only they used
removed, and the inputs that became unused removed from the graph and its pytree input spec:
a graph copy, not a capture (milliseconds instead of seconds).

An input the model computes a default for when it is absent (`position_ids`) is replaced by
that default computed in the graph (peftc.capture.input_defaults checks the default holds for
the model before the superset takes the input). An input dropped while the outputs it feeds
stay (labels kept, `num_items_in_batch` dropped) needs the computation itself to change;
`mean_from_sum` does this for the one case HF models have (a sum-reduced cross entropy
divided by the item count is the mean-reduced one). When a dropped input is still read after
all that, no graph can be derived and the caller captures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

import peftc.ir.cross_entropy  # noqa: F401  registers peftc::cross_entropy
from peftc.capture.calls import CallSignature
from peftc.capture.input_defaults import DEFAULTS, EMBEDS_INPUT, MAIN_INPUT, substitute_default

aten = torch.ops.aten

# input name -> which output fields (by name, at any depth of the output's ModelOutputs) it switches on
DROPPABLE: dict[str, Callable[[str], bool]] = {
    "labels": lambda field: field == "loss",
    "num_items_in_batch": lambda field: False,  # scales the loss; see mean_from_sum
    "output_hidden_states": lambda field: field == "hidden_states" or field.endswith("_hidden_states"),
    "output_attentions": lambda field: field == "attentions" or field.endswith("_attentions"),
    # computed from input_ids where the graph read them (peftc.capture.input_defaults): no output changes
    **{name: (lambda field: False) for name in DEFAULTS},
}
_SUM, _MEAN = 2, 1  # torch's reduction enum (cross_entropy_loss's `reduction` argument)
# The loss ops a summed loss can come from, and where their `reduction` argument is
# (peftc::cross_entropy: the train plan's lower_cross_entropy).
REDUCTION_ARG = {aten.cross_entropy_loss.default: 3, torch.ops.peftc.cross_entropy.default: 2}
DERIVED_REMOVED = "peftc_derived_removed"  # gm.meta: how many of the superset graph's nodes derivation removed
GUARDS = "_guards_fn"  # the submodule torch.export's .module() calls with every input to check its guards


def dropped_inputs(superset: CallSignature, call: CallSignature) -> list[str] | None:
    """The keywords of `superset` that `call` leaves out, when `call` is `superset` minus droppable
    inputs (same positional arguments, every other keyword of the same kind); else None."""
    if call.args != superset.args:
        return None
    wide, narrow = dict(superset.kwargs), dict(call.kwargs)
    if any(wide.get(name) != kind for name, kind in narrow.items()):
        return None
    dropped = [name for name in wide if name not in narrow]
    return dropped if dropped and all(name in DROPPABLE for name in dropped) else None


def derive_graph(gm: GraphModule, superset: CallSignature, call: CallSignature,
                 stand_ins: Callable[[dict], dict] | None = None) -> GraphModule | None:
    """The graph for `call`, derived from `gm` (captured for `superset`), or None if it cannot be.

    `stand_ins(kwargs)` gives values for the dropped inputs shaped after a call's own, so that
    torch.export's input guards still check every call (see DerivedGuards); without it the
    derived graph runs no guards.
    """
    dropped = dropped_inputs(superset, call)
    info = getattr(gm.graph._codegen, "pytree_info", None)  # torch.export's (args, kwargs) and output specs
    if dropped is None or info is None or not is_args_kwargs(info.in_spec) or info.out_spec is None:
        return None
    graph = Graph(owning_module=gm)  # dead-code elimination asks the owner whether a called submodule is pure
    values: dict[Node, Node] = {}
    outputs = graph.graph_copy(gm.graph, values)
    if not isinstance(outputs, (list, tuple)):
        return None
    switched_on = [DROPPABLE[name] for name in dropped]
    out_spec, leaves = _prune_fields(info.out_spec, list(outputs), lambda field: any(on(field) for on in switched_on))
    graph.output(type(outputs)(leaves))
    inputs = inputs_by_keyword(graph, info.in_spec)
    guards = _detach_guards(graph, inputs, dropped, stand_ins)
    _sizes_from_kept_inputs(graph, inputs, dropped)
    drop_checks_on(graph, [node for name in dropped for node in inputs.get(name, [])])
    if not _defaults_substituted(graph, inputs, [name for name in dropped if name in DEFAULTS]):
        return None
    graph.eliminate_dead_code()
    counts = inputs.get("num_items_in_batch", []) if "num_items_in_batch" in dropped else []
    if not all(mean_from_sum(count) for count in counts):
        return None
    graph.eliminate_dead_code()
    for name in dropped:
        for node in inputs.get(name, []):
            if node.users:
                return None  # still read: the graph without it is a different computation
            graph.erase_node(node)
    in_spec = _without_keywords(info.in_spec, dropped)
    codegen = gm.graph._codegen.__class__(info._replace(
        orig_args=[a for a in info.orig_args if a not in dropped], in_spec=in_spec, out_spec=out_spec))
    graph.set_codegen(codegen)
    derived = GraphModule(gm, graph)
    for name, child in gm.named_children():  # GraphModule copies only what the graph reads; keep whole
        derived.add_module(name, child)      # trees (packed-weight modules that report() walks)
    if guards is not None:
        derived.add_module(GUARDS, DerivedGuards(gm.get_submodule(GUARDS), *guards))
    derived.meta.update(gm.meta)
    derived.meta[DERIVED_REMOVED] = len(gm.graph.nodes) - len(graph.nodes)  # report() counts captured nodes
    derived._in_spec, derived._out_spec = in_spec, out_spec  # what torch.export's graph modules carry
    return derived


def _sizes_from_kept_inputs(graph: Graph, inputs: dict[str, list[Node]], dropped: list[str]) -> None:
    """Read each size the graph takes from a dropped input (export takes the batch size from whichever input
    carries it first: ViT's from `labels`) from a kept input with the same symbolic size instead."""
    kept: dict[str, tuple[Node, int]] = {}
    for name, nodes in inputs.items():
        for node in nodes if name not in dropped else []:
            value = node.meta.get("val")
            for dim, size in enumerate(value.shape if isinstance(value, torch.Tensor) else ()):
                if isinstance(size, torch.SymInt):
                    kept.setdefault(str(size), (node, dim))
    for node in (node for name in dropped for node in inputs.get(name, [])):
        for user in list(node.users):
            size = str(user.meta.get("val")) if user.target is aten.sym_size.int else None
            if size in kept:
                user.args = kept[size]


def _defaults_substituted(graph: Graph, inputs: dict[str, list[Node]], names: list[str]) -> bool:
    """Each of `names` (dropped inputs with a checked default) computed from the call's input_ids instead
    (or from the inputs_embeds in their place: the defaults read only batch and sequence sizes)."""
    main = inputs.get(MAIN_INPUT) or inputs.get(EMBEDS_INPUT, [])
    if names and (len(main) != 1 or any(len(inputs.get(name, [])) != 1 for name in names)):
        return False
    for name in names:
        substitute_default(graph, inputs[name][0], main[0], name)
    return True


def mean_from_sum(count: Node) -> bool:
    """Rewrite `cross_entropy(..., reduction=sum) / count` to `cross_entropy(..., reduction=mean)`.

    transformers' losses divide a summed loss by `num_items_in_batch` when it is passed and take
    the mean otherwise; the mean of a cross entropy with `ignore_index` is the sum over the
    targets it counts divided by their number, so the two agree. False if `count` has another use.
    """
    rewrites = []
    for div in _users_through_casts(count):
        if div.target is not aten.div.Tensor or _through_casts(div.args[1]) is not count:
            return False
        loss = _through_casts(div.args[0])
        if loss.target not in REDUCTION_ARG or len(loss.users) != 1 or _reduction(loss) != _SUM:
            return False
        rewrites.append((div, loss))
    for div, loss in rewrites:
        if len(loss.args) > REDUCTION_ARG[loss.target]:
            loss.update_arg(REDUCTION_ARG[loss.target], _MEAN)
        else:
            loss.update_kwarg("reduction", _MEAN)
        div.replace_all_uses_with(div.args[0])
        div.graph.erase_node(div)
    return True


CASTS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default)


def _through_casts(node: Node) -> Node:
    while isinstance(node, Node) and node.op == "call_function" and node.target in CASTS:
        node = node.args[0]
    return node


def _users_through_casts(node: Node) -> list[Node]:
    users = []
    for user in node.users:
        users.extend(_users_through_casts(user) if user.target in CASTS else [user])
    return users


def _reduction(loss: Node) -> int:
    if "reduction" in loss.kwargs:
        return loss.kwargs["reduction"]
    index = REDUCTION_ARG[loss.target]
    return loss.args[index] if len(loss.args) > index else _MEAN


def _prune_fields(spec: pytree.TreeSpec, leaves: list, drop: Callable[[str], bool]) -> tuple[pytree.TreeSpec, list]:
    """`spec` and its flat `leaves` without the fields `drop` names, in every ModelOutput or dict inside."""
    if spec.is_leaf():
        return spec, leaves
    keyed = isinstance(spec.context, (list, tuple)) and all(isinstance(k, str) for k in spec.context)
    kept_context, kept_children, kept_leaves, start = [], [], [], 0
    for index, child in enumerate(spec.children()):
        part = leaves[start:start + child.num_leaves]
        start += child.num_leaves
        if keyed and drop(spec.context[index]):
            continue
        child, part = _prune_fields(child, part, drop)
        kept_children.append(child)
        kept_leaves.extend(part)
        if keyed:
            kept_context.append(spec.context[index])
    context = kept_context if keyed else spec.context
    return pytree.TreeSpec(spec.type, context, kept_children), kept_leaves


def _detach_guards(graph: Graph, inputs: dict[str, list[Node]], dropped: list[str],
                   stand_ins: Callable[[dict], dict] | None) -> tuple | None:
    """Call torch.export's input-guard module with the kept inputs only (DerivedGuards fills in the
    dropped ones), or remove its call when it cannot be kept: it reads every input of the captured
    call. Returns DerivedGuards' arguments after the guard module, or None."""
    node = next((n for n in graph.find_nodes(op="call_module") if n.target == GUARDS and not n.users), None)
    if node is None:
        return None
    single = all(len(nodes) == 1 for nodes in inputs.values())
    # The inputs export's guards read: all but those a pass added after the capture (a served graph's adapter_ids).
    names = [name for name, nodes in inputs.items() if single and nodes[0] in node.args]
    if stand_ins is None or not single or list(node.args) != [inputs[name][0] for name in names]:
        graph.erase_node(node)
        return None
    kept = [name for name in names if name not in dropped]
    constants = {name: inputs[name][0].meta.get("val") for name in dropped
                 if not isinstance(inputs[name][0].meta.get("val"), torch.Tensor)}  # flags: the captured value
    node.args = tuple(inputs[name][0] for name in kept)
    return kept, names, constants, stand_ins


class DerivedGuards(nn.Module):
    """torch.export's guards of the superset call, run on a derived call: the inputs the call leaves
    out are stand-ins shaped after its own (labels like its input_ids), so each relation between the
    inputs it passes (`attention_mask.size(1) == input_ids.size(1)`) is still checked and reported."""

    def __init__(self, guards: nn.Module, kept: list[str], names: list[str], constants: dict,
                 stand_ins: Callable[[dict], dict]):
        super().__init__()
        self.guards = guards
        self.kept, self.names = kept, names
        self.constants, self.stand_ins = constants, stand_ins

    def forward(self, *values):
        given = dict(zip(self.kept, values))
        filled = {**self.constants, **self.stand_ins(given), **given}
        if any(name not in filled for name in self.names):
            return None  # no stand-in for a dropped input: the graph's own ops check this call
        return self.guards(*(filled[name] for name in self.names))


def drop_checks_on(graph: Graph, inputs: list[Node]) -> None:
    """Remove the metadata and shape assertions on values computed from `inputs`: they have no users,
    so dead-code elimination keeps them (and all they read) as side effects."""
    computed = set(inputs)
    for node in graph.nodes:
        if node not in computed and any(arg in computed for arg in node.all_input_nodes):
            computed.add(node)
    for node in reversed(list(graph.nodes)):
        if node in computed and node.op == "call_function" and not node.users and is_check(node):
            graph.erase_node(node)


def is_check(node: Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return name.startswith(("_assert", "sym_constrain_range"))


def inputs_by_keyword(graph: Graph, in_spec: pytree.TreeSpec) -> dict[str, list[Node]]:
    """The placeholders of each keyword argument (a keyword holding a tuple has several)."""
    placeholders = list(graph.find_nodes(op="placeholder"))
    args_spec, kwargs_spec = in_spec.children()
    start = args_spec.num_leaves
    out = {}
    for name, child in zip(kwargs_spec.context, kwargs_spec.children()):
        out[name] = placeholders[start:start + child.num_leaves]
        start += child.num_leaves
    return out


def _without_keywords(in_spec: pytree.TreeSpec, names: list[str]) -> pytree.TreeSpec:
    args_spec, kwargs_spec = in_spec.children()
    kept = [(k, c) for k, c in zip(kwargs_spec.context, kwargs_spec.children()) if k not in names]
    kwargs_spec = pytree.TreeSpec(dict, [k for k, _ in kept], [c for _, c in kept])
    return pytree.TreeSpec(tuple, None, [args_spec, kwargs_spec])


def is_args_kwargs(spec: pytree.TreeSpec) -> bool:
    return (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
            and spec.child(1).type is dict)

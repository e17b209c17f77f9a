"""A call with `inputs_embeds` in place of `input_ids`, derived from the input_ids graph without export.

transformers models read `inputs_embeds` as the output of their token embedding: `if inputs_embeds is
None: inputs_embeds = self.embed_tokens(input_ids)` (the module `get_input_embeddings()` returns;
Gemma's scale by sqrt(hidden) is inside that module, so embeddings passed in are not scaled again).
So the graph of `cm(inputs_embeds=e, ...)` is the superset graph with the output of that module's call
on input_ids replaced by a new input, and every size the graph read from input_ids (batch, sequence)
read from inputs_embeds instead (`swap_in_embeds`); the calls that pass fewer optional inputs are then
derived from it as from the input_ids graph (peftc.capture.specialize).

Where a model reads input_ids for anything else (a classifier's last non-pad token, a LoRA or
trainable-tokens branch on the embedding) the rewrite finds a use it cannot move and gives up, and
the call captures. The model itself is checked too (`embeds_hold`): on a small padded call its
output from input_ids must equal its output from `get_input_embeddings()(input_ids)` bit for bit.

Prompt methods (prompt tuning, p-tuning) prepend their virtual tokens to the embedding output, as
HF PEFT's PeftModelForCausalLM prepends them to the inputs_embeds it is given: the graph's lookup of
the lengthened ids (N pad ids, then input_ids) is followed by a slice that drops the N pad rows,
and that slice is what the passed embeddings replace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from peftc.capture.binding import forward_signature
from peftc.capture.calls import CallSignature
from peftc.capture.input_defaults import EMBEDS_INPUT, MAIN_INPUT, checking, identical, once_per_model, small_call
from peftc.capture.specialize import (
    DERIVED_REMOVED,
    GUARDS,
    derive_graph,
    drop_checks_on,
    inputs_by_keyword,
    is_args_kwargs,
)
from peftc.capture.superset import ExtraInputs

aten = torch.ops.aten

# ops between input_ids and the lookup that keep the ids' values and shape (GPT-2 views them [-1, seq])
ID_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
            aten.clone.default)
SEQ_END = 2**63 - 1  # slice's "to the end"


def derive_embeds_graph(gm: GraphModule, superset: CallSignature, call: CallSignature,
                        model: nn.Module) -> GraphModule | None:
    """The graph for `call` (inputs_embeds, no input_ids, a subset of the superset's other inputs), derived
    from `gm` (captured for `superset`, with input_ids), or None if it cannot be."""
    wide, narrow = dict(superset.kwargs), dict(call.kwargs)
    if EMBEDS_INPUT not in narrow or MAIN_INPUT in narrow or MAIN_INPUT not in wide or EMBEDS_INPUT in wide:
        return None
    path = embedding_path(model)
    if path is None or not embeds_hold(model):
        return None
    swapped = swap_in_embeds(gm, path, narrow[EMBEDS_INPUT])
    if swapped is None:
        return None
    del wide[MAIN_INPUT]
    wide[EMBEDS_INPUT] = narrow[EMBEDS_INPUT]
    wide_call = CallSignature(superset.args, tuple(sorted(wide.items())))
    if wide_call == call:
        return swapped
    return derive_graph(swapped, wide_call, call, EmbedsStandIns(ExtraInputs.of(model)))


def embedding_path(model: nn.Module) -> str | None:
    """The module path of the model's token embedding (`get_input_embeddings()`), or None."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((name for name, module in model.named_modules() if module is embedding), None)


@once_per_model
def embeds_hold(model: nn.Module) -> bool:
    """Whether `model` computes the same from `get_input_embeddings()(input_ids)` passed as inputs_embeds as
    from input_ids (with labels where its head takes them), on a small call with a left-padded and a
    right-padded row whose padding holds the pad token (a model that finds the last real token from the
    ids, as classifiers do, differs there); once per model."""
    return _check(model)


def _check(model: nn.Module) -> bool:
    call = small_call(model, None)
    if EMBEDS_INPUT not in forward_signature(model).parameters or call is None or MAIN_INPUT not in call:
        return False
    call = _with_pad_tokens(model, call)
    loss = ExtraInputs.of(model).loss(call)
    others = {name: value for name, value in call.items() if name != MAIN_INPUT}
    try:
        with checking(model):
            by_ids = model(**call, **loss)
            by_embeds = model(inputs_embeds=model.get_input_embeddings()(call[MAIN_INPUT]), **others, **loss)
            return identical(by_ids, by_embeds)
    except Exception:  # noqa: BLE001  a model that refuses the check's call captures inputs_embeds calls
        return False


def _with_pad_tokens(model: nn.Module, call: dict) -> dict:
    """The check's call with the pad token at the masked positions: row 0 left-padded, row 1 right-padded."""
    pad = getattr(model.config, "pad_token_id", None)
    ids, mask = call[MAIN_INPUT].clone(), call["attention_mask"].clone()
    mask[1, -1] = 0
    if isinstance(pad, int) and 0 <= pad < model.config.vocab_size:
        ids[mask == 0] = pad
    return {**call, MAIN_INPUT: ids, "attention_mask": mask}


def swap_in_embeds(gm: GraphModule, embedding: str, kind: str) -> GraphModule | None:
    """`gm` taking inputs_embeds (of `kind`, as CallSignature writes it) where it took input_ids: the output
    of the token embedding module (at path `embedding`) on input_ids replaced by the new input, the sizes
    read from input_ids read from it. None where input_ids has another use."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or not is_args_kwargs(info.in_spec) or MAIN_INPUT not in info.in_spec.child(1).context:
        return None
    graph = Graph(owning_module=gm)
    graph.output(graph.graph_copy(gm.graph, {}))
    (ids,) = inputs_by_keyword(graph, info.in_spec)[MAIN_INPUT]
    replaced = _embeddings_of(graph, ids, embedding)
    if replaced is None or _kind(replaced) != kind:
        return None
    with graph.inserting_before(ids):
        embeds = graph.placeholder(EMBEDS_INPUT)
    embeds.meta["val"] = replaced.meta["val"]
    replaced.replace_all_uses_with(embeds)
    drop_checks_on(graph, [ids])
    graph.eliminate_dead_code()
    if not _sizes_moved(graph, ids, embeds):
        return None
    graph.erase_node(ids)
    return _module_for(gm, graph, info, ids_position=list(graph.find_nodes(op="placeholder")).index(embeds))


def _embeddings_of(graph: Graph, ids: Node, embedding: str) -> Node | None:
    """The node inputs_embeds stands for: the token embedding module's output on `ids` (or, after a prompt
    method lengthened the ids, the slice of it past the virtual tokens), with its other uses (sizes)
    moved to read the slice. None if there is no such lookup."""
    for lookup in graph.find_nodes(op="call_function", target=aten.embedding.default):
        if _module_path(lookup) != embedding:
            continue
        output = _module_output(lookup, embedding)
        source = _through_views(lookup.args[1])
        if source is ids:
            return output
        prepended = _prepended(source, ids)
        return _past_prepended(output, prepended) if prepended is not None else None
    return None


def _module_output(lookup: Node, embedding: str) -> Node:
    """The last node of the embedding module's own ops after `lookup` (Gemma scales the lookup inside it)."""
    output = lookup
    while len(output.users) == 1:
        (user,) = output.users
        if embedding not in _module_paths(user):
            break
        output = user
    return output


def _prepended(source: Node, ids: Node) -> int | None:
    """N, where `source` is `cat([N pad ids, ids], 1)` (insert_prompt's lengthened ids); else None."""
    if source.target is not aten.cat.default or len(source.args) < 2 or source.args[1] != 1:
        return None
    parts = source.args[0]
    if len(parts) != 2 or _through_views(parts[1]) is not ids:
        return None
    width = parts[0].meta["val"].shape[1] if isinstance(parts[0], Node) and "val" in parts[0].meta else None
    return width if isinstance(width, int) else None


def _past_prepended(output: Node, width: int) -> Node | None:
    """The one slice `output[:, width:]`, when every other use of `output` reads its batch or feature size
    (moved to the slice); else None."""
    slices = [u for u in output.users if u.target is aten.slice.Tensor and list(u.args[1:]) == [1, width, SEQ_END]]
    sizes = [u for u in output.users if u.target is aten.sym_size.int and u.args[1] in (0, 2)]
    if len(slices) != 1 or len(slices) + len(sizes) != len(output.users):
        return None
    for size in sizes:
        size.args = (slices[0], size.args[1])
    return slices[0]


def _sizes_moved(graph: Graph, ids: Node, embeds: Node) -> bool:
    """Point every read of input_ids' batch or sequence size (directly, through a view, or the batch size of
    the ids a prompt method lengthened) and the input guards at `embeds`; False if input_ids is still
    read for anything else."""
    for user in list(ids.users):
        if _prepended(user, ids) is not None:
            for size in list(user.users):
                if size.target is aten.sym_size.int and size.args[1] == 0:
                    size.args = (embeds, 0)
    graph.eliminate_dead_code()
    return _uses_moved(graph, ids, embeds)


def _uses_moved(graph: Graph, ids: Node, embeds: Node) -> bool:
    for user in list(ids.users):
        if user.target in ID_VIEWS and _same_shape(user, ids) and _uses_moved(graph, user, embeds):
            graph.erase_node(user)
        elif user.target is aten.sym_size.int and user.args[1] in (0, 1):
            user.args = (embeds, user.args[1])
        elif user.op == "call_module" and user.target == GUARDS:
            user.replace_input_with(ids, embeds)
        else:
            return False
    return not ids.users


def _module_for(gm: GraphModule, graph: Graph, info, ids_position: int) -> GraphModule:
    """The GraphModule running `graph`, called with inputs_embeds in input_ids' place (keyword and order)."""
    args_spec, kwargs_spec = info.in_spec.children()
    keys = [EMBEDS_INPUT if key == MAIN_INPUT else key for key in kwargs_spec.context]
    in_spec = type(info.in_spec)(tuple, None, [args_spec, type(kwargs_spec)(dict, keys, kwargs_spec.children())])
    graph.set_codegen(gm.graph._codegen.__class__(info._replace(
        orig_args=[EMBEDS_INPUT if a == MAIN_INPUT else a for a in info.orig_args], in_spec=in_spec)))
    swapped = GraphModule(gm, graph)
    for name, child in gm.named_children():  # the whole trees, as derive_graph keeps them
        swapped.add_module(name, child)
    if GUARDS in dict(gm.named_children()):
        swapped.add_module(GUARDS, EmbedsGuards(gm.get_submodule(GUARDS), ids_position))
    swapped.meta.update(gm.meta)
    swapped.meta[DERIVED_REMOVED] = gm.meta.get(DERIVED_REMOVED, 0) + len(gm.graph.nodes) - len(graph.nodes)
    swapped._in_spec, swapped._out_spec = in_spec, info.out_spec
    return swapped


class EmbedsGuards(nn.Module):
    """torch.export's guards of the input_ids call, run on an inputs_embeds call: token ids of the
    embeddings' batch and sequence sizes stand in, so the relations between the inputs still hold."""

    def __init__(self, guards: nn.Module, position: int):
        super().__init__()
        self.guards, self.position = guards, position

    def forward(self, *values):
        values = list(values)
        embeds = values[self.position]
        values[self.position] = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.guards(*values)


@dataclass(frozen=True)
class EmbedsStandIns:
    """ExtraInputs for a call with inputs_embeds: shaped after token ids of the embeddings' sizes."""

    extra: ExtraInputs

    def __call__(self, kwargs: dict) -> dict:
        embeds = kwargs.get(EMBEDS_INPUT)
        if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2 and MAIN_INPUT not in kwargs:
            ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            return self.extra({**kwargs, MAIN_INPUT: ids})
        return self.extra(kwargs)


def _through_views(node):
    while isinstance(node, Node) and node.target in ID_VIEWS:
        node = node.args[0]
    return node


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and str(va.shape) == str(vb.shape)


def _module_paths(node: Node) -> list[str]:
    return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def _module_path(node: Node) -> str | None:
    paths = _module_paths(node)
    return paths[-1] if paths else None


def _kind(node: Node) -> str | None:
    value = node.meta.get("val")
    return dict(CallSignature.of((), {"x": value}).kwargs)["x"] if isinstance(value, torch.Tensor) else None

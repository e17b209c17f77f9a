"""A forward with a KV cache derived from the superset graph, without export.

The superset graph (peftc.compiler.first_build) is a call without a cache, traced for a past of
length 0; its capture marked where the model writes its cache (peftc.capture.cache_points: each
layer's keys and values after rotary, before grouped-query attention repeats them). The cached
graph is that graph, first specialized to the call's other inputs (peftc.capture.specialize, or
peftc.capture.embeds_input for inputs_embeds), then:

- each layer's marked keys and values become `cat([past_<i>, new], 2)` (DynamicLayer.update's
  concatenation), read by the attention as the update's result was, and returned as the layer's cache;
- the mask the attentions of one layer kind read (`layer_kinds`: full causal, or sliding-window causal;
  peftc.capture.attention_sites finds the attentions: SDPA, and transformers' eager attention, matmul +
  mask, softmax, matmul), which the superset traced for keys as
  long as the new tokens, becomes an input, `peftc_causal_mask` (`peftc_sliding_mask` for the sliding
  layers' mask, where the model has them), [batch, 1, new, past + new], made by
  the runtime as the original makes it for a cached call (peftc.runtime.cache_derivation): for SDPA the
  boolean output of transformers' mask code; for eager attention the float mask eager_mask makes from
  it, `where(mask, 0, min)`, which the graph reads through peftc.ir.causal_attention.additive_mask (a
  boolean mask is made float there, as eager_mask makes it). `position_ids` stay an input (the runtime
  counts them from the past length where the call passes none);
- every size the graph read from the padding mask (GPT-2 reads the sequence length there) is read
  from the new tokens instead, and the ops between a concatenation and its attention (repeat_kv's
  expand and reshape) take the concatenation's length where they took the new tokens' one. Between
  eager attention's two matmuls no op takes a size: the scores and weights follow the keys' length.

Anything else is refused (None, and the caller captures): no marks, a layer count that differs, a mask
that is not one tensor shared by every attention of a layer kind and read by nothing else (boolean, or for eager
attention made from a boolean one by `where`), an op between the keys and the attention that is not a
view, an attention reading them other than as its keys or values, a size computed from the sequence
length there, or a padding mask still read afterwards.
What the derivation cannot see (positions or lengths a model computes from the cache) is checked on the
model's own outputs by the runtime's gate before a derived graph runs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from peftc.capture.cache_points import (
    CACHE_PARAMETERS,
    CACHE_POINT,
    KEYS,
    ROLES,
    VALUES,
)
from peftc.capture.attention_sites import AttentionSite, attention_sites
from peftc.capture.calls import CallSignature
from peftc.capture.embeds_input import derive_embeds_graph
from peftc.capture.input_defaults import EMBEDS_INPUT, MAIN_INPUT
from peftc.capture.specialize import GUARDS, derive_graph, inputs_by_keyword, is_check
from peftc.capture.superset import ExtraInputs
from peftc.ir.causal_attention import additive_mask

aten = torch.ops.aten
MASK_INPUT = "peftc_causal_mask"  # the attention mask input of a derived cached graph (full-attention layers)
SLIDING_MASK_INPUT = "peftc_sliding_mask"  # the sliding-window layers' one
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types
MASK_INPUTS = {FULL: MASK_INPUT, SLIDING: SLIDING_MASK_INPUT}
PAST_INPUTS = ("past_keys", "past_values")  # one tensor per layer each, as WithTensorCache takes them
POSITIONS, PADDING_MASK, USE_CACHE = "position_ids", "attention_mask", "use_cache"
CACHE_DERIVED = "peftc_cache_derived"  # gm.meta: the graph takes MASK_INPUT and position_ids
SEQ = 2  # the sequence dim of keys and values [batch, heads, seq, head_dim]
# ops that may stand between the cache update and the attention (transformers' repeat_kv, casts)
KV_VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                      aten.unsqueeze.default, aten.slice.Tensor, aten.clone.default, aten.contiguous.default,
                      aten.transpose.int, aten.permute.default, aten.alias.default, aten.to.dtype,
                      aten._to_copy.default})
WHERE = (aten.where.ScalarOther, aten.where.self, aten.where.Scalar)  # eager_mask's `where(mask, 0, min)`


@dataclasses.dataclass(frozen=True)
class Derived:
    """A derived cached graph and the output field the runtime puts the cache in."""

    graph_module: GraphModule
    cache_field: str


def layer_kinds(config) -> list[str] | None:
    """Each decoder layer's attention, FULL or SLIDING (config.layer_types; Mistral's `sliding_window`
    without them slides in every layer), or None where a derived graph cannot serve the model: chunked
    (Llama 4) or bidirectional attention, another layer type, or attention logits softcapped (Gemma 2)."""
    if not getattr(config, "is_causal", True) or getattr(config, "attention_chunk_size", None) is not None:
        return None
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return None
    types = getattr(config, "layer_types", None)
    if types is None:
        types = [SLIDING if getattr(config, "sliding_window", None) is not None else FULL] * config.num_hidden_layers
    types = list(types)
    if any(kind not in MASK_INPUTS for kind in types) or (SLIDING in types and not config.sliding_window):
        return None
    return types


def derive_cached_graph(gm: GraphModule, superset: CallSignature, inputs: dict, model,
                        kinds: list[str]) -> Derived | None:
    """The cached-forward graph for a call passing `inputs` (besides the cache), derived from the superset
    graph `gm` (flat, captured for `superset`) for a model whose decoder layers attend as `kinds` say
    (layer_kinds), or None."""
    layers = len(kinds)
    plain = _plain_graph(gm, superset, inputs, model)
    info = getattr(plain.graph._codegen, "pytree_info", None) if plain is not None else None
    if info is None or info.out_spec is None:
        return None
    plain = _copied(plain) if plain is gm else plain  # a derived graph is ours to edit; the superset's is not
    cache_field = _cache_field(info.out_spec.type)
    graph = plain.graph
    output = graph.output_node()
    leaves = output.args[0]
    inputs_of = inputs_by_keyword(graph, info.in_spec)
    keys, values = _points(graph, ROLES[0]), _points(graph, ROLES[1])
    sites = attention_sites(graph)
    masks = _masks_by_kind(sites, kinds)
    main = (inputs_of.get(MAIN_INPUT) or inputs_of.get(EMBEDS_INPUT) or [None])[0]
    if cache_field is None or masks is None or len(keys) != layers or len(values) != layers or main is None:
        return None
    _drop_checks(graph)
    if any(node.users for node in inputs_of.get(USE_CACHE, [])):
        return None
    for node in inputs_of.get(USE_CACHE, []):  # the plain graph's constant, not an input of a cached call
        graph.erase_node(node)
    pasts, made = _new_inputs(graph, layers, masks)
    for mask, mask_input in zip(masks.values(), made):
        mask.replace_all_uses_with(_mask_as_read(graph, mask_input, mask, sites[0].additive))
    joined = [_join(graph, past, new) for past, new in zip(pasts, keys + values)]
    output.args = ((*leaves, *joined),)
    graph.eliminate_dead_code()
    reads = _reads(sites)
    if not all(_kv_sizes(graph, cat, main, reads) for cat in joined):
        return None
    if not _sizes_from_new_tokens(graph, inputs_of.get(PADDING_MASK, []), main):
        return None
    graph.eliminate_dead_code()
    return Derived(_as_cached(plain, info, layers, [MASK_INPUTS[kind] for kind in masks]), cache_field)


def _plain_graph(gm: GraphModule, superset: CallSignature, inputs: dict, model) -> GraphModule | None:
    """The superset graph specialized to the call without a cache: its inputs, position_ids kept as an input."""
    wide = dict(superset.kwargs)
    if POSITIONS not in wide:
        return None
    call = {name: kind for name, kind in CallSignature.of((), inputs).kwargs}
    call[POSITIONS] = wide[POSITIONS]
    if USE_CACHE in wide:
        call[USE_CACHE] = wide[USE_CACHE]
    narrow = CallSignature((), tuple(sorted(call.items())))
    if narrow == superset:
        return gm
    if EMBEDS_INPUT in call:
        return derive_embeds_graph(gm, superset, narrow, model)
    return derive_graph(gm, superset, narrow, ExtraInputs.of(model))


def _cache_field(output_type: type) -> str | None:
    """The field of the model's output class that holds its cache (`cache`, `past_key_values`)."""
    if not dataclasses.is_dataclass(output_type):
        return None
    return next((f.name for f in dataclasses.fields(output_type) if f.name in CACHE_PARAMETERS), None)


def _points(graph: Graph, role: str) -> list[Node]:
    return [node for node in graph.nodes if node.meta.get(CACHE_POINT) == role]


def _masks_by_kind(sites: list[AttentionSite], kinds: list[str]) -> dict[str, Node] | None:
    """The 4-D mask node the attentions of each layer kind read (site i is layer i's attention), FULL's
    first, or None: every attention of a kind reads one mask, no mask is read by two kinds or by anything
    else, and each is transformers' boolean mask (SDPA) or the float mask eager_mask makes from it."""
    if len(sites) != len(kinds) or len({site.additive for site in sites}) != 1:
        return None
    masks: dict[str, Node] = {}
    for kind in (FULL, SLIDING):
        of_kind = [site for site, site_kind in zip(sites, kinds) if site_kind == kind]
        if of_kind:
            mask = _shared_mask(of_kind)
            if mask is None or mask in masks.values():
                return None
            masks[kind] = mask
    return masks


def _shared_mask(sites: list[AttentionSite]) -> Node | None:
    """The one 4-D mask node every attention reads, read by nothing else, or None: transformers' boolean mask
    (SDPA), or the float mask eager_mask makes from it, `where(boolean mask, 0, min)` (eager attention)."""
    masks, kinds = {site.mask for site in sites}, {site.additive for site in sites}
    if len(masks) != 1 or len(kinds) != 1 or None in masks:
        return None
    (mask,), (additive,) = masks, kinds
    readers = frozenset().union(*(site.nodes for site in sites))
    if any(user not in readers for user in mask.users):
        return None
    if additive:  # eager attention's float mask: made by eager_mask's where from the boolean one
        boolean = mask.args[0] if mask.target in WHERE else None
    else:
        boolean = mask
    value = boolean.meta.get("val") if isinstance(boolean, Node) else None
    return mask if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() == 4 else None


def _mask_as_read(graph: Graph, mask_input: Node, mask: Node, additive: bool) -> Node:
    """What the attentions read in place of `mask`: the input itself, or for eager attention the input as a
    float mask of the traced one's dtype (peftc.ir.causal_attention.additive_mask: the runtime's mask is
    eager_mask's own for a model configured eager, a boolean one otherwise)."""
    if not additive:
        return mask_input
    with graph.inserting_after(mask_input):
        read = graph.call_function(additive_mask, (mask_input, mask.meta["val"].dtype))
    read.meta["val"] = mask.meta["val"]
    return read


def _reads(sites: list[AttentionSite]) -> dict[Node, set[int]]:
    """Each node that reads keys or values for an attention, and the argument positions it reads them at."""
    reads: dict[Node, set[int]] = {}
    for site in sites:
        for node, position in site.reads:
            reads.setdefault(node, set()).add(position)
    return reads


def _drop_checks(graph: Graph) -> None:
    """Remove the superset's input guards and shape assertions: they tie the padding mask's length to the
    new tokens', which a cached call breaks (the runtime checks the cache and the inputs instead)."""
    for node in reversed(list(graph.nodes)):
        if not node.users and ((node.op == "call_module" and node.target == GUARDS)
                               or (node.op == "call_function" and is_check(node))):
            graph.erase_node(node)


def _new_inputs(graph: Graph, layers: int, masks: dict[str, Node]) -> tuple[list[Node], list[Node]]:
    """Placeholders after the last one: each layer's past keys, then values, then a mask per kind."""
    last = list(graph.find_nodes(op="placeholder"))[-1]
    names = [f"{group}_{i}" for group in PAST_INPUTS for i in range(layers)] + [MASK_INPUTS[k] for k in masks]
    made = []
    with graph.inserting_after(last):
        for name in reversed(names):  # each inserted right after `last`: reversed, they end up in order
            made.insert(0, graph.placeholder(name))
    mask_inputs = made[2 * layers:]
    for mask, mask_input in zip(masks.values(), mask_inputs):
        mask_input.meta["val"] = mask.meta["val"]
    return made[:2 * layers], mask_inputs


def _join(graph: Graph, past: Node, new: Node) -> Node:
    """`cat([past, new], 2)` in place of `new` for everything that read it."""
    users = list(new.users)
    with graph.inserting_after(new):
        cat = graph.call_function(aten.cat.default, ([past, new], SEQ))
    cat.meta.update({k: v for k, v in new.meta.items() if k != CACHE_POINT})
    for user in users:
        user.replace_input_with(new, cat)
    return cat


def _kv_sizes(graph: Graph, cat: Node, main: Node, reads: dict[Node, set[int]]) -> bool:
    """Make the ops between `cat` and the attentions reading it take its length where they took the new
    tokens' (repeat_kv's expand and reshape); False if an op there is not a view, a size is computed
    from that length, or an attention reads it other than as keys or values (`reads`)."""
    new_length = _symbol(main, 1)
    region, frontier = [], [cat]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.op == "output":
                continue
            if user in reads:
                if not _read_at(user, node, reads[user]):
                    return False
                continue
            if user.op != "call_function" or user.target not in KV_VIEWS:
                return False
            region.append(user)
            frontier.append(user)
    length: list[Node] = []

    def kv_length() -> Node:
        if not length:
            with graph.inserting_after(cat):
                length.append(graph.call_function(aten.sym_size.int, (cat, SEQ)))
        return length[0]

    for node in region:
        sizes = [arg for arg in node.all_input_nodes if isinstance(arg.meta.get("val"), torch.SymInt)]
        if any(str(size.meta["val"]) != new_length and new_length in _free(size) for size in sizes):
            return False
        for size in sizes:
            if str(size.meta["val"]) == new_length:
                node.replace_input_with(size, kv_length())
    return True


def _read_at(user: Node, node: Node, positions: set[int]) -> bool:
    """Whether `user` reads `node` at argument `positions` only."""
    at = {i for i, arg in enumerate(user.args) if arg is node}
    return bool(at) and at <= positions and node not in user.kwargs.values()


def _sizes_from_new_tokens(graph: Graph, padding_mask: list[Node], main: Node) -> bool:
    """Read the sizes the graph still takes from the padding mask ([batch, past + new] in a cached call)
    from the new tokens' input where the superset tied the two; False if the mask is still read otherwise."""
    for mask in padding_mask:
        for user in list(mask.users):
            dim = user.args[1] if user.target is aten.sym_size.int else None
            if dim not in (0, 1) or _symbol(mask, dim) != _symbol(main, dim):
                return False
            user.args = (main, dim)
    return True


def _symbol(node: Node, dim: int) -> str:
    return str(node.meta["val"].shape[dim])


def _free(size: Node) -> set[str]:
    return {str(s) for s in size.meta["val"].node.expr.free_symbols}


def _copied(gm: GraphModule) -> GraphModule:
    graph = Graph(owning_module=gm)
    graph.output(graph.graph_copy(gm.graph, {}))
    graph.set_codegen(type(gm.graph._codegen)(gm.graph._codegen.pytree_info))  # graph_copy keeps the nodes only
    copy = GraphModule(gm, graph)
    for name, child in gm.named_children():  # whole trees, as derive_graph keeps them
        copy.add_module(name, child)
    copy.meta.update(gm.meta)
    return copy


def _as_cached(gm: GraphModule, info, layers: int, masks: list[str]) -> GraphModule:
    """`gm`, its graph edited in place, called as before plus the past tensors and the `masks`, returning
    {"output": the model's output, KEYS: each layer's keys, VALUES: each layer's values}."""
    leaf = pytree.tree_structure(0)
    per_layer = pytree.TreeSpec(list, None, [leaf] * layers)
    args_spec, kwargs_spec = info.in_spec.children()
    kept = [(name, child) for name, child in zip(kwargs_spec.context, kwargs_spec.children()) if name != USE_CACHE]
    kwargs_spec = pytree.TreeSpec(dict, [name for name, _ in kept] + [*PAST_INPUTS, *masks],
                                  [child for _, child in kept] + [per_layer, per_layer] + [leaf] * len(masks))
    in_spec = pytree.TreeSpec(tuple, None, [args_spec, kwargs_spec])
    tuple_spec = pytree.TreeSpec(tuple, None, [leaf] * layers)
    out_spec = pytree.TreeSpec(dict, ["output", KEYS, VALUES], [info.out_spec, tuple_spec, tuple_spec])
    gm.graph.set_codegen(gm.graph._codegen.__class__(info._replace(
        orig_args=[a for a in info.orig_args if a != USE_CACHE] + [*PAST_INPUTS, *masks], in_spec=in_spec,
        out_spec=out_spec)))
    if GUARDS in gm._modules:  # its call was dropped with the superset's checks
        del gm._modules[GUARDS]
    gm.recompile()
    gm.meta[CACHE_DERIVED] = True
    gm._in_spec, gm._out_spec = in_spec, out_spec
    return gm

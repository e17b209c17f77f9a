"""A call with `logits_to_keep`, derived from the superset graph without export.

transformers' causal LMs project only the positions a call keeps onto the vocabulary:
`logits = lm_head(hidden_states[:, slice_indices, :])`, `slice_indices` being `slice(-k, None)` for an
int k (0: every position) or the 1-D index tensor passed, and the loss (with labels) reads those
logits. The superset call keeps every position, so its graph holds `hidden_states[:, 0:]` right
before the LM head (`get_output_embeddings()`) and its adapters; the graph of a call keeping
positions is that graph with that slice replaced by `hidden_states[:, positions]`, `positions` one
more graph input (`keep_positions`). The calls passing fewer optional inputs are then derived from
it as from the superset graph (peftc.capture.specialize, peftc.capture.embeds_input).

An int k is passed to the graph as the positions it keeps, `arange(seq)[-k:]` (`positions_to_keep`),
so every k runs one graph: a graph per value would add a graph for each new k a loop passes (GRPO
passes the completion length, which changes every batch). Both rest on how the model reads
logits_to_keep, so the model is checked once (`kept_logits_hold`): on a small left-padded call its
logits with an int k and with an index tensor must be the matching rows of the same logits.
A model that fails the check, a 2-D or boolean logits_to_keep, or a graph whose LM head reads
something else than that slice captures the call instead, as before.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree

from peftc.capture.binding import forward_signature
from peftc.capture.calls import CallSignature, is_hf_model
from peftc.capture.embeds_input import SEQ_END
from peftc.capture.input_defaults import EMBEDS_INPUT, MAIN_INPUT, checking, once_per_model, small_call
from peftc.capture.specialize import DERIVED_REMOVED, GUARDS, is_args_kwargs

aten = torch.ops.aten

LOGITS_TO_KEEP = "logits_to_keep"
INDEX_DTYPES = (torch.int64, torch.int32)


def positions_to_keep(model: nn.Module, kwargs: dict) -> dict:
    """`kwargs` with an int logits_to_keep given as the 1-D positions it keeps, where the model reads the two
    alike (`kept_logits_hold`): one graph then runs every k."""
    keep = kwargs.get(LOGITS_TO_KEEP)
    if isinstance(keep, bool) or not isinstance(keep, int) or not is_hf_model(model):
        return kwargs
    main = kwargs.get(MAIN_INPUT, kwargs.get(EMBEDS_INPUT))
    if not isinstance(main, torch.Tensor) or main.dim() < 2 or not kept_logits_hold(model):
        return kwargs
    positions = torch.arange(main.shape[1], device=main.device)[slice(-keep, None)]  # the model's own slice
    return {**kwargs, LOGITS_TO_KEEP: positions}


@once_per_model
def kept_logits_hold(model: nn.Module) -> bool:
    """Whether `model` reads logits_to_keep as transformers' causal LMs do, on a small left-padded call: an int k
    keeps the last k positions' logits and 1-D positions keep those positions', rows of one and the same logits
    (two calls: k = seq - 1, and positions out of order among those rows); once per model."""
    return _check(model)


def _check(model: nn.Module) -> bool:
    call = small_call(model, None)
    if LOGITS_TO_KEEP not in forward_signature(model).parameters or call is None or MAIN_INPUT not in call:
        return False
    seq = call[MAIN_INPUT].shape[1]
    positions = torch.tensor([seq - 1, 1, 2], device=call[MAIN_INPUT].device)  # out of order, as a caller may pass
    try:
        with checking(model):
            last = model(**call, logits_to_keep=seq - 1).logits  # positions 1 .. seq-1
            picked = model(**call, logits_to_keep=positions).logits
    except Exception:  # noqa: BLE001  a model that refuses the check's calls captures logits_to_keep calls
        return False
    return isinstance(last, torch.Tensor) and last.shape[1] == seq - 1 and _close(picked, last[:, positions - 1])


def _close(a, b) -> bool:
    # the same rows through a matmul over fewer rows: equal up to the order of a sum, not bit for bit
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def derive_kept_logits_graph(gm: GraphModule, superset: CallSignature, call: CallSignature, model: nn.Module,
                             derive_rest) -> GraphModule | None:
    """The graph for `call` (1-D logits_to_keep positions, a subset of the superset's other inputs), derived
    from `gm` (captured for `superset`, keeping every position), or None if it cannot be.
    `derive_rest(graph, wide, call)` derives `call` from the graph keeping positions (`wide` its signature)."""
    wide, narrow = dict(superset.kwargs), dict(call.kwargs)
    kind = narrow.get(LOGITS_TO_KEEP, "")
    if LOGITS_TO_KEEP in wide or not any(kind == _index_kind(dtype) for dtype in INDEX_DTYPES):
        return None
    head = output_embeddings_path(model)
    if head is None or not kept_logits_hold(model):
        return None
    kept = keep_positions(gm, head)
    if kept is None:
        return None
    wide_call = CallSignature(superset.args, tuple(sorted({**wide, LOGITS_TO_KEEP: kind}.items())))
    return kept if wide_call == call else derive_rest(kept, wide_call, call)


def output_embeddings_path(model: nn.Module) -> str | None:
    """The module path of the model's LM head (`get_output_embeddings()`), or None."""
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


def keep_positions(gm: GraphModule, head: str) -> GraphModule | None:
    """`gm` taking logits_to_keep positions (a last keyword input): the full slice of the hidden states every
    op of the LM head (at path `head`, its adapters included) reads replaced by those positions' rows.
    None where the head reads anything else."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or not is_args_kwargs(info.in_spec):
        return None
    graph = Graph(owning_module=gm)
    graph.output(graph.graph_copy(gm.graph, {}))
    full = _head_input(graph, head)
    if full is None:
        return None
    placeholders = list(graph.find_nodes(op="placeholder"))
    with graph.inserting_after(placeholders[-1]):
        positions = graph.placeholder(LOGITS_TO_KEEP)
    with graph.inserting_after(full):
        kept = graph.call_function(aten.index.Tensor, (full.args[0], [None, positions]))
    kept.meta = {**full.meta}  # its module stack; "val" keeps the full length (nothing after reads it)
    full.replace_all_uses_with(kept)
    graph.erase_node(full)
    guards = next((n for n in graph.find_nodes(op="call_module") if n.target == GUARDS), None)
    if guards is not None:
        guards.args = (*guards.args, positions)
    return _module_for(gm, graph, info, guarded=guards is not None)


def _head_input(graph: Graph, head: str) -> Node | None:
    """The one value the LM head's ops read from outside it, when that is `hidden_states[:, 0:]`; else None."""
    ops = [n for n in graph.nodes if n.op == "call_function" and _module_path(n) == head]
    inside = set(ops)
    outside = {arg for op in ops for arg in op.all_input_nodes if arg not in inside and arg.op != "get_attr"}
    if len(outside) != 1:
        return None
    (full,) = outside
    is_full_slice = full.target is aten.slice.Tensor and list(full.args[1:]) == [1, 0, SEQ_END]
    return full if is_full_slice and all(user in inside for user in full.users) else None


def _module_for(gm: GraphModule, graph: Graph, info, guarded: bool) -> GraphModule:
    """The GraphModule running `graph`, called with logits_to_keep as its last keyword."""
    args_spec, kwargs_spec = info.in_spec.children()
    leaf = pytree.treespec_leaf()
    kwargs_spec = type(kwargs_spec)(dict, [*kwargs_spec.context, LOGITS_TO_KEEP], [*kwargs_spec.children(), leaf])
    in_spec = type(info.in_spec)(tuple, None, [args_spec, kwargs_spec])
    graph.set_codegen(gm.graph._codegen.__class__(info._replace(
        orig_args=[*info.orig_args, LOGITS_TO_KEEP], in_spec=in_spec)))
    kept = GraphModule(gm, graph)
    for name, child in gm.named_children():  # the whole trees, as derive_graph keeps them
        kept.add_module(name, child)
    if guarded:
        kept.add_module(GUARDS, KeptGuards(gm.get_submodule(GUARDS)))
    kept.meta.update(gm.meta)
    kept.meta[DERIVED_REMOVED] = gm.meta.get(DERIVED_REMOVED, 0) + len(gm.graph.nodes) - len(graph.nodes)
    kept._in_spec, kept._out_spec = in_spec, info.out_spec
    return kept


class KeptGuards(nn.Module):
    """torch.export's guards of the superset call, run on a call keeping positions: its other inputs are
    the superset's, so the guards check them; the positions (the last input) are the model's to check."""

    def __init__(self, guards: nn.Module):
        super().__init__()
        self.guards = guards

    def forward(self, *values):
        return self.guards(*values[:-1])


def _index_kind(dtype: torch.dtype) -> str:
    return dict(CallSignature.of((), {"x": torch.empty(0, dtype=dtype)}).kwargs)["x"]


def _module_path(node: Node) -> str | None:
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    return paths[-1] if paths else None

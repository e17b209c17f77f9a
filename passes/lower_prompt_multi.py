"""lower_prompt_multi: give each served row its prompt adapter's virtual tokens, with per-row masks and positions."""

from __future__ import annotations

import torch
from peftc.passes.add_routing_input import routing_input
from torch.fx import GraphModule, Node

from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.lora_bank import ServingPlan
from peftc.ir.virtual_bank import PromptBank
from peftc.pipeline.runner import PassContext, PassResult

from ._attention import attention_ops, sdpa_arg
from ._site_output import current_output
from ._virtual_rows import row_lengths, visible_slots
from .insert_prompt import INDEX_PASSTHROUGH, SEQ_END, SEQUENCE_INPUTS

aten = torch.ops.aten
SLOT = "prompt_multi"  # peftc.<embedding path>.prompt_multi.{embedding, lengths, slots}
ROUTED_INPUTS = ("attention_mask", "position_ids")  # the served call always passes them (serving.virtual_inputs)
CACHE_POSITION = "cache_position"  # generation graphs (runtime.kv_cache) take it: where in the cache the tokens go


def lower_prompt_multi(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Prepend `width` slots to every row: its own prompt in the last N, masked padding before it."""
    plan: ServingPlan = ctx.serving
    if not plan.prompt_paths:
        return PassResult(modified=False)
    if len(plan.prompt_paths) > 1:
        raise SpecError(f"served prompt adapters prepend at different embeddings {sorted(plan.prompt_paths)}; "
                        "serve adapters trained on one model")
    path = next(iter(plan.prompt_paths))
    site = next((s for s in ctx.sites if s.path == path and s.kind == "embedding"), None)
    if site is None:
        raise SpecError(f"a served prompt adapter prepends at {path!r}, which is no embedding of this model; "
                        "was it trained on another model?")
    inputs = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    missing = [name for name in ROUTED_INPUTS if name not in inputs]
    if missing and CACHE_POSITION not in inputs:
        raise ValueError(f"lower_prompt_multi: the graph has no {missing} input; served calls pass them "
                         "(peftc.serving.virtual_inputs)")
    bank, created = adapters.get_or_create(ctx.adapter_root, path, SLOT, lambda: PromptBank(
        path, list(plan.adapters), ctx.base_params[site.param]))
    width = bank.embedding.shape[1]
    seq_ids = routing_input(gm)
    embedding_op = next(n for n in gm.graph.nodes if n.name == site.node_name)
    tag = {"pass": "lower_prompt_multi", "method": "prompt", "site": path, "slot": SLOT, "entry": None}
    if CACHE_POSITION in inputs:  # a generation graph: the caller's sequence holds the slots already
        _prompts_at_slots(gm, embedding_op, seq_ids, inputs[CACHE_POSITION], path, width, tag)
    else:
        _lengthen_inputs(gm, seq_ids, _token_ids(embedding_op, site.input_index), inputs, path, width, tag)
        _prepend_prompts(gm, embedding_op, seq_ids, path, width, tag)
    if plan.gathered:
        _zero_unattended_queries(gm, tag)
    result = PassResult(modified=True, sites=[path])
    if created:
        result.params_added.update({f"{path}.{SLOT}.embedding": bank.embedding.numel()})
    prompts = [a.name for a in plan.adapters if path in a.sites]
    result.notes.append(f"{width} virtual-token slots per row; prompts of {', '.join(prompts)} right-aligned in them")
    return result


def _token_ids(embedding_op: Node, index: int) -> Node:
    source = embedding_op.args[index]
    while isinstance(source, Node) and source.target in INDEX_PASSTHROUGH:
        source = source.args[0]
    if not (isinstance(source, Node) and source.op == "placeholder"):
        raise SpecError("a served prompt adapter needs the token embedding fed by the input ids")
    return source


def _lengthen_inputs(gm: GraphModule, seq_ids: Node, token_ids: Node, inputs: dict[str, Node], path: str,
                     width: int, tag: dict) -> None:
    """Each sequence-aligned input gains `width` leading positions: padding for the ids, labels and
    token types; the row's visible slots for the mask; for positions, the prompt's own 0..N-1
    and the tokens' shifted by N (the left padding repeats position 0, as transformers does)."""
    ins = Inserter(gm, seq_ids, tag)
    lengths = row_lengths(ins, path, SLOT, seq_ids)
    visible, offset = visible_slots(ins, path, SLOT, lengths, width)
    leading = {token_ids: None}
    leading.update({inputs[name]: None for name in SEQUENCE_INPUTS if name in inputs})
    leading[inputs["position_ids"]] = None
    for placeholder in leading:
        if placeholder.meta.get("val") is None or placeholder.meta["val"].dim() != 2:
            continue
        users = [u for u in placeholder.users if u.op == "call_function"]
        if placeholder.name == "attention_mask":
            first = ins.call(aten._to_copy.default, visible, dtype=placeholder.meta["val"].dtype)
            rest = placeholder
        elif placeholder.name == "position_ids":
            first = ins.call(aten.clamp_min.default, offset, 0)
            rest = ins.call(aten.add.Tensor, placeholder, ins.call(aten.unsqueeze.default, lengths, 1))
        else:
            batch = ins.call(aten.sym_size.int, placeholder, 0)
            first = ins.call(aten.new_full.default, placeholder, [batch, width], SEQUENCE_INPUTS.get(placeholder.name, 0))
            rest = _first_label_unpredicted(ins, placeholder, lengths) if placeholder.name == "labels" else placeholder
        redirect_users(users, placeholder, ins.call(aten.cat.default, [first, rest], 1))


def _first_label_unpredicted(ins: Inserter, labels: Node, lengths: Node) -> Node:
    """`labels` with the first one ignored in rows without virtual tokens: the loss predicts each label from the
    position before it, which for such a row is a masked padding slot (its own model has no position there);
    a prompt row's last virtual token predicts it, as in its own model."""
    prompted = ins.call(aten.unsqueeze.default, ins.call(aten.gt.Scalar, lengths, 0), 1)
    head = ins.call(aten.slice.Tensor, labels, 1, 0, 1)
    head = ins.call(aten.where.ScalarOther, prompted, head, SEQUENCE_INPUTS["labels"])
    return ins.call(aten.cat.default, [head, ins.call(aten.slice.Tensor, labels, 1, 1, SEQ_END)], 1)


def _prepend_prompts(gm: GraphModule, embedding_op: Node, seq_ids: Node, path: str, width: int, tag: dict) -> None:
    """The embedding output's first `width` positions (padding ids) -> each row's bank row."""
    y = current_output(embedding_op)
    users = list(y.users)
    ins = Inserter(gm, y, tag)
    prompts = ins.call(aten.index.Tensor, ins.get_attr(adapters.target(path, SLOT, "embedding")), [seq_ids])
    tokens = ins.call(aten.slice.Tensor, y, 1, width, SEQ_END)
    out = ins.call(aten.cat.default, [prompts, tokens], 1)
    out.meta["peftc"]["role"] = "output"
    redirect_users(users, y, out)


def _prompts_at_slots(gm: GraphModule, embedding_op: Node, seq_ids: Node, cache_position: Node, path: str,
                      width: int, tag: dict) -> None:
    """Generation graphs: the served generate() puts `width` padding slots before each prompt and their
    mask and positions in the call (peftc.serving.virtual_inputs); the embedding output at cache
    positions below `width` becomes the row's bank row there. Decode steps are past the slots."""
    y = current_output(embedding_op)
    users = list(y.users)
    ins = Inserter(gm, y, tag)
    prompts = ins.call(aten.index.Tensor, ins.get_attr(adapters.target(path, SLOT, "embedding")), [seq_ids])
    picked = ins.call(aten.index_select.default, prompts, 1, ins.call(aten.clamp_max.default, cache_position,
                                                                      width - 1))
    inside = ins.call(aten.lt.Scalar, cache_position, width)
    inside = ins.call(aten.unsqueeze.default, ins.call(aten.unsqueeze.default, inside, 0), 2)
    out = ins.call(aten.where.self, inside, picked, y)
    out.meta["peftc"]["role"] = "output"
    redirect_users(users, y, out)


def _zero_unattended_queries(gm: GraphModule, tag: dict) -> None:
    """The export form: each attention op's output is 0 on query rows whose mask hides every key.

    A row's slots before its own N (all `width` of them for rows without a prompt) are queries that
    see no key: torch's attention returns 0 there (its safe softmax), ONNX Runtime a uniform average
    over the hidden keys, and from that layer on those padding positions differ (the tokens' outputs
    do not: the slots are hidden from them). Written out, torch's answer is ONNX Runtime's too.
    The plan runs lower_prefix_multi first: the masks read here hold the prefix columns already."""
    for node, _ in attention_ops(gm):
        mask = sdpa_arg(node, 3)
        if mask is None or mask.meta["val"].dtype != torch.bool:
            continue  # an additive mask never hides a key outright: both runtimes agree
        users = list(node.users)
        ins = Inserter(gm, node, tag)
        sees_a_key = ins.call(aten.any.dim, mask, -1, True)
        redirect_users(users, node, ins.call(aten.where.ScalarOther, sees_a_key, node, 0.0))

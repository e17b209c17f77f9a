"""insert_prompt: prepend N learned virtual tokens to the token embeddings (prompt tuning, Lester et al.)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import positive_int
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._per_site import in_dtype_of, in_virtual_token_dtype
from ._site_output import current_output

aten = torch.ops.aten

# Generation graphs (peftc.runtime.kv_cache) take it: where in the KV cache the call's tokens go.
CACHE_POSITION = "cache_position"
# Inputs aligned with the token sequence, and what their N prepended positions hold (as HF PEFT does:
# the virtual tokens are attended to, have token type 0, and are ignored by the loss).
SEQUENCE_INPUTS = {"attention_mask": 1, "token_type_ids": 0, "labels": -100}
INDEX_PASSTHROUGH = (aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.alias.default,
                     aten.clone.default, aten._unsafe_view.default)
SEQ_END = 2**63 - 1


@dataclass(frozen=True)
class PromptConfig:
    """Prompt tuning: `num_tokens` trained embeddings before the input tokens; outputs gain N positions."""

    method = "prompt"
    num_tokens: int = field(default=8, metadata={"check": positive_int})

    @property
    def prepended_tokens(self) -> int:
        """How many positions the method puts before the input tokens (generate() makes room for them)."""
        return self.num_tokens


class PromptWeights(nn.Module):
    """embedding [num_tokens, dim], laid out as HF PEFT's prompt_encoder embedding weight."""

    def __init__(self, weight: torch.Tensor, config: PromptConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(config.num_tokens, weight.shape[1], device=weight.device,
                                                  dtype=weight.dtype))
        if not self.embedding.is_meta:
            nn.init.normal_(self.embedding)


def insert_prompt(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Prepend the prompt at the token embedding's output and lengthen the sequence-aligned inputs by N."""
    config: PromptConfig = ctx.entry
    return prepend_virtual_tokens(gm, ctx, "insert_prompt", config.num_tokens,
                                  lambda weight: PromptWeights(weight, config),
                                  lambda ins, tensor, module: tensor("embedding"))


def prepend_virtual_tokens(gm: GraphModule, ctx: PassContext, pass_name: str, num_tokens: int,
                           make_module: Callable[[torch.Tensor], nn.Module],
                           make_prompt: Callable[[Inserter, Callable[[str], Node], nn.Module], Node]) -> PassResult:
    """What every prompt method does: lengthen the sequence-aligned inputs by `num_tokens` and prepend
    the [num_tokens, dim] prompt `make_prompt(inserter, adapter_tensor, module)` builds at the token
    embedding's output (prompt tuning: the embedding itself; p-tuning: an encoder over it)."""
    site, ids = _token_embedding(gm, ctx)
    weight = ctx.base_params[site.param]
    module, created = adapters.get_or_create(ctx.adapter_root, site.path, ctx.slot,
                                             lambda: in_virtual_token_dtype(make_module(weight), weight))
    tag = {"pass": pass_name, "method": ctx.entry.method, "site": site.path, "slot": ctx.slot,
           "entry": ctx.entry_index}
    embedding_op = next(n for n in gm.graph.nodes if n.name == site.node_name)

    def prompt_at(ins: Inserter) -> Node:
        prompt = make_prompt(ins, lambda name: ins.get_attr(adapters.target(site.path, ctx.slot, name)), module)
        return in_dtype_of(ins, prompt, current_output(embedding_op))

    cache_position = next((n for n in gm.graph.find_nodes(op="placeholder") if n.name == CACHE_POSITION), None)
    if cache_position is not None:  # a generation graph: generate() put N slots before the prompt tokens
        _prompt_at_cache_slots(gm, embedding_op, cache_position, num_tokens, tag, prompt_at)
    else:
        _lengthen_inputs(gm, ids, num_tokens, tag)
        _prepend_prompt(gm, embedding_op, num_tokens, tag, prompt_at)
    result = PassResult(modified=True, sites=[site.path])
    if created:
        result.params_added.update(adapters.parameter_counts(site.path, ctx.slot, module))
    return result


def _token_embedding(gm: GraphModule, ctx: PassContext) -> tuple[Site, Node]:
    """The first embedding site whose indices are a graph input (through views): the token embedding."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in ctx.sites:
        if site.kind != "embedding":
            continue
        source = nodes[site.node_name].args[site.input_index]
        while isinstance(source, Node) and source.target in INDEX_PASSTHROUGH:
            source = source.args[0]
        if isinstance(source, Node) and source.op == "placeholder":
            return site, source
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    raise SpecError(
        f"adapters[{ctx.entry_index}].method: {ctx.entry.method!r} prepends virtual tokens at the token embedding, "
        f"but this model has no embedding lookup fed by an input (its inputs: {inputs}); use 'prefix' or 'adapter' instead")


def _lengthen_inputs(gm: GraphModule, ids: Node, num_tokens: int, tag: dict) -> None:
    """Give the token ids and the sequence-aligned inputs N leading positions, so every length the
    graph derives from them (masks, positions, token types, loss) covers the virtual tokens."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if "position_ids" in [p.name for p in placeholders]:
        raise NotImplementedError(
            "prompt tuning with explicit position_ids: call the model without position_ids "
            "(HF PEFT ignores them for prompt tuning too)")
    fills = {ids: 0}
    for p in placeholders:
        val = p.meta.get("val")
        if p.name in SEQUENCE_INPUTS and isinstance(val, torch.Tensor) and val.dim() == 2:
            fills[p] = SEQUENCE_INPUTS[p.name]
    ins = Inserter(gm, placeholders[-1], tag)
    for placeholder, fill in fills.items():
        users = [u for u in placeholder.users if u.op == "call_function"]
        batch = ins.call(aten.sym_size.int, placeholder, 0)
        pad = ins.call(aten.new_full.default, placeholder, [batch, num_tokens], fill)
        longer = ins.call(aten.cat.default, [pad, placeholder], 1)
        redirect_users(users, placeholder, longer)


def _prepend_prompt(gm: GraphModule, node: Node, num_tokens: int, tag: dict,
                   make_prompt: Callable[[Inserter], Node]) -> None:
    """Replace the first N (padding) positions of the embedding output by the [N, dim] prompt
    `make_prompt` inserts."""
    y = current_output(node)
    users = list(y.users)
    ins = Inserter(gm, y, tag)
    prompt = make_prompt(ins)
    batch = ins.call(aten.sym_size.int, y, 0)
    prompt = ins.call(aten.expand.default, ins.call(aten.unsqueeze.default, prompt, 0), [batch, -1, -1])
    tokens = ins.call(aten.slice.Tensor, y, 1, num_tokens, SEQ_END)
    out = ins.call(aten.cat.default, [prompt, tokens], 1)
    redirect_users(users, y, out)


def _prompt_at_cache_slots(gm: GraphModule, node: Node, cache_position: Node, num_tokens: int, tag: dict,
                           make_prompt: Callable[[Inserter], Node]) -> None:
    """Generation graphs: the embedding output at cache positions 0..N-1 (the slots generate() puts before
    the prompt) becomes the prompt's row there, so the virtual tokens sit in the KV cache as the first N
    entries; decode steps are past them and keep their own embedding."""
    y = current_output(node)
    users = list(y.users)
    ins = Inserter(gm, y, tag)
    prompt = make_prompt(ins)
    rows = ins.call(aten.index_select.default, prompt, 0, ins.call(aten.clamp_max.default, cache_position,
                                                                    num_tokens - 1))
    inside = ins.call(aten.lt.Scalar, cache_position, num_tokens)
    inside = ins.call(aten.unsqueeze.default, ins.call(aten.unsqueeze.default, inside, 0), 2)
    out = ins.call(aten.where.self, inside, ins.call(aten.unsqueeze.default, rows, 0), y)
    redirect_users(users, y, out)

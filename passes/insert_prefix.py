"""insert_prefix: learned key/value prefixes at every attention op (prefix tuning, Li & Liang 2021)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import boolean, positive_int
from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, redirect_users
from peftc.pipeline.runner import PassContext, PassResult

from ._attention import attention_ops, head_layout, sdpa_arg, set_sdpa_arg
from ._per_site import in_dtype_of, in_virtual_token_dtype

aten = torch.ops.aten
POSITION_OPS = (aten.cos.default, aten.sin.default, aten.embedding.default)


@dataclass(frozen=True)
class PrefixConfig:
    """`num_tokens` trained key and value vectors per attention op, seen by every query (in a sliding-window
    layer, by those within the window of the prefix's cache positions 0..N-1, as HF PEFT's).

    The real tokens' positions move to N..N+S-1, as with HF PEFT's KV-cache prefix; prefix keys
    are not rotated. `gate: true` scales the prefix values by a learned sigmoid gate computed
    from the queries (UniPELT).
    """

    method = "prefix"
    num_tokens: int = field(default=8, metadata={"check": positive_int})
    gate: bool = field(default=False, metadata={"check": boolean})


class PrefixWeights(nn.Module):
    """key, value [kv_heads, num_tokens, head_dim]: one attention layer's slice of HF PEFT's prefix table."""

    def __init__(self, kv_heads: int, head_dim: int, heads: int, like: torch.Tensor, config: PrefixConfig):
        super().__init__()
        factory = dict(device=like.device, dtype=like.dtype)
        self.key = nn.Parameter(torch.empty(kv_heads, config.num_tokens, head_dim, **factory))
        self.value = nn.Parameter(torch.empty(kv_heads, config.num_tokens, head_dim, **factory))
        if config.gate:
            self.gate = nn.Parameter(torch.zeros(heads, head_dim, 1, **factory))
            self.gate_bias = nn.Parameter(torch.zeros(heads, 1, 1, **factory))
        if not self.key.is_meta:
            nn.init.normal_(self.key)
            nn.init.normal_(self.value)


def insert_prefix(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Concatenate prefix keys/values before each attention op's keys/values; widen its mask; shift positions."""
    config: PrefixConfig = ctx.entry
    attention = attention_ops(gm)
    if not attention:
        raise SpecError(
            f"adapters[{ctx.entry_index}].method: 'prefix' adds keys/values at attention ops "
            "(aten.scaled_dot_product_attention), and this model has none; use 'prompt' or 'adapter' instead")
    like = next(iter(ctx.base_params.values()))
    windows = _windows(attention, ctx)
    result = PassResult(modified=True)
    for (node, path), window in zip(attention, windows):
        heads, kv_heads, groups, head_dim = head_layout(node)
        module, created = adapters.get_or_create(
            ctx.adapter_root, path, ctx.slot,
            lambda: in_virtual_token_dtype(PrefixWeights(kv_heads, head_dim, heads, like, config), like))
        _rewrite_attention(gm, node, path, groups, ctx, config, window)
        result.sites.append(path)
        if created:
            result.params_added.update(adapters.parameter_counts(path, ctx.slot, module))
    shifted = _shift_positions(gm, [node for node, _ in attention], config.num_tokens, result.sites[0], ctx)
    if not shifted:
        result.notes.append("prefix: no past-length position offset found; positions not shifted")
    return result


def _windows(attention: list, ctx: PassContext) -> list:
    """Each attention op's sliding window (None: full), from the model's layers in order (one op per layer)."""
    windows = ctx.shared.attention_windows
    if not windows:
        return [None] * len(attention)
    if len(windows) != len(attention):
        raise SpecError(f"adapters[{ctx.entry_index}].method: 'prefix' on a model with sliding-window layers needs one "
                        f"attention op per layer to know which slide; this graph has {len(attention)} for "
                        f"{len(windows)} layers")
    return list(windows)


def _rewrite_attention(gm: GraphModule, node: Node, path: str, groups: int, ctx: PassContext,
                       config: PrefixConfig, window: int | None = None) -> None:
    tag = {"pass": "insert_prefix", "method": "prefix", "site": path, "slot": ctx.slot, "entry": ctx.entry_index}
    query, key, value = sdpa_arg(node, 0), sdpa_arg(node, 1), sdpa_arg(node, 2)
    ins = Inserter(gm, node.prev, tag)
    batch = ins.call(aten.sym_size.int, query, 0)
    prefix_k = _batched(ins, in_dtype_of(ins, ins.get_attr(adapters.target(path, ctx.slot, "key")), key), groups, batch)
    prefix_v = _batched(ins, in_dtype_of(ins, ins.get_attr(adapters.target(path, ctx.slot, "value")), value),
                        groups, batch)
    if config.gate:
        prefix_v = ins.call(aten.mul.Tensor, prefix_v, in_dtype_of(ins, _gate(ins, query, path, ctx), value))
    set_sdpa_arg(node, 1, ins.call(aten.cat.default, [prefix_k, key], 2))
    set_sdpa_arg(node, 2, ins.call(aten.cat.default, [prefix_v, value], 2))
    mask = _widened_mask(ins, node, query, key, config.num_tokens, window, _cache_positions(gm))
    if mask is not None:
        set_sdpa_arg(node, 3, mask)
    if sdpa_arg(node, 5, False):
        set_sdpa_arg(node, 5, False)  # the widened mask now says what is_causal said, prefix columns included


def _batched(ins: Inserter, prefix: Node, groups: int, batch: Node) -> Node:
    """[kv, N, d] -> [batch, kv * groups, N, d], repeating each kv head as repeat_kv does."""
    kv, n, d = prefix.meta["val"].shape
    if groups > 1:
        prefix = ins.call(aten.expand.default, ins.call(aten.unsqueeze.default, prefix, 1), [kv, groups, n, d])
        prefix = ins.call(aten.reshape.default, prefix, [kv * groups, n, d])
    return ins.call(aten.expand.default, ins.call(aten.unsqueeze.default, prefix, 0), [batch, -1, -1, -1])


def _gate(ins: Inserter, query: Node, path: str, ctx: PassContext) -> Node:
    """sigmoid(mean over queries of q·w + b): one gate per batch row and head, shape [b, h, 1, 1]."""
    weight = ins.get_attr(adapters.target(path, ctx.slot, "gate"))
    bias = ins.get_attr(adapters.target(path, ctx.slot, "gate_bias"))
    query = in_dtype_of(ins, query, weight)  # the gate computes in its weights' dtype
    logits = ins.call(aten.mean.dim, ins.call(aten.matmul.default, query, weight), [2], True)
    return ins.call(aten.sigmoid.default, ins.call(aten.add.Tensor, logits, bias))


def _widened_mask(ins: Inserter, node: Node, query: Node, key: Node, num_tokens: int, window: int | None = None,
                  cache_positions: Node | None = None) -> Node:
    """The attention mask with N leading key columns: every query may attend to them, but in a sliding-window
    layer only those within the window (`_prefix_in_window`)."""
    mask = sdpa_arg(node, 3)
    visible = _prefix_in_window(ins, query, key, num_tokens, window, cache_positions) if window else None
    if mask is None:
        if not sdpa_arg(node, 5, False) and visible is None:
            return None  # every key visible already, the prefix too
        q_len = ins.call(aten.sym_size.int, query, 2)
        k_len = ins.call(aten.sym_size.int, key, 2)
        real = ins.call(aten.new_ones.default, query, [q_len, k_len], dtype=torch.bool)
        if sdpa_arg(node, 5, False):
            real = ins.call(aten.tril.default, real)
        prefix = visible if visible is not None else ins.call(aten.new_ones.default, query, [q_len, num_tokens],
                                                             dtype=torch.bool)
        return ins.call(aten.cat.default, [prefix, real], 1)
    dims = [ins.call(aten.sym_size.int, mask, d) for d in range(mask.meta["val"].dim() - 1)]
    boolean = mask.meta["val"].dtype == torch.bool
    block = ins.call(aten.new_ones.default if boolean else aten.new_zeros.default, mask, [*dims, num_tokens])
    if visible is not None:
        hidden = True if boolean else torch.finfo(mask.meta["val"].dtype).min
        block = ins.call(aten.logical_and.default, block, visible) if boolean else \
            ins.call(aten.masked_fill.Scalar, block, ins.call(aten.logical_not.default, visible), hidden)
    return ins.call(aten.cat.default, [block, mask], -1)


def _prefix_in_window(ins: Inserter, query: Node, key: Node, num_tokens: int, window: int,
                      cache_positions: Node | None) -> Node:
    """[queries, N] bool: which prefix columns each query sees in a sliding-window layer. PEFT's prefix holds
    the cache's positions 0..N-1 and a query at the real position p sits at N + p, so prefix j is within the
    window iff N + p - j < W. p is the generation graphs' `cache_position` input where there is one, else the
    last q_len of the real keys (no past, or a cached forward's past followed by the new tokens)."""
    if cache_positions is None:
        q_len = ins.call(aten.sym_size.int, query, 2)
        k_len = ins.call(aten.sym_size.int, key, 2)
        cache_positions = ins.call(aten.arange.start, ins.call(operator.sub, k_len, q_len), k_len,
                                   device=query.meta["val"].device)
    columns = ins.call(aten.arange.default, num_tokens, device=query.meta["val"].device)
    # j >= N + p - W + 1, per query (rows) and prefix column
    first = ins.call(aten.add.Tensor, ins.call(aten.unsqueeze.default, cache_positions, 1), num_tokens - window + 1)
    return ins.call(aten.ge.Tensor, ins.call(aten.unsqueeze.default, columns, 0), first)


def _cache_positions(gm: GraphModule) -> Node | None:
    """The generation graphs' `cache_position` input (peftc.runtime.kv_cache): each new token's cache slot."""
    return next((n for n in gm.graph.find_nodes(op="placeholder") if n.name == "cache_position"), None)


def _shift_positions(gm: GraphModule, attention: list[Node], num_tokens: int, path: str, ctx: PassContext) -> int:
    """Offset the real tokens' positions by N. Given as `position_ids` (generate() passes them), the input
    gains N, as HF PEFT adds num_virtual_tokens to the position_ids of a prefix-tuned call. Otherwise
    HF models build them as arange(S) + past_length, with past_length the constant 0 here, or in a graph
    taking past keys and values as tensors (peftc.runtime.forward_cache) their length: the prefix is not
    in that cache, so the positions gain N on every call. The offset nodes are those feeding rotary
    (cos/sin) or position-embedding lookups rather than masks."""
    inputs = list(gm.graph.find_nodes(op="placeholder"))
    given = next((n for n in inputs if n.name == "position_ids"), None)
    if given is not None:
        users = [u for u in given.users if u.op == "call_function"]
        tag = {"pass": "insert_prefix", "method": "prefix", "site": path, "slot": ctx.slot, "entry": ctx.entry_index}
        redirect_users(users, given, Inserter(gm, inputs[-1], tag).call(aten.add.Tensor, given, num_tokens))
        return len(users)
    shifted = 0
    for node in gm.graph.nodes:
        if (node.op == "call_function" and node.target == aten.add.Tensor and len(node.args) == 2
                and isinstance(node.args[0], Node) and node.args[0].target == aten.arange.default
                and (node.args[1] == 0 or _is_size(node.args[1])) and _feeds_positions(node, set(attention))):
            past = node.args[1]
            if isinstance(past, Node):
                with gm.graph.inserting_before(node):
                    past = gm.graph.call_function(operator.add, (past, num_tokens))
            node.args = (node.args[0], past if isinstance(past, Node) else num_tokens)
            shifted += 1
    return shifted


def _is_size(value) -> bool:
    """A size read from a tensor (the past length: `past_keys_<i>.size(2)`)."""
    return isinstance(value, Node) and value.target == aten.sym_size.int


def _feeds_positions(start: Node, stops: set[Node]) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen or user in stops:
                continue
            if user.target in POSITION_OPS:
                return True
            seen.add(user)
            todo.append(user)
    return False


"""Where each attention of an exported graph reads its keys, its values and its mask.

A cached graph is derived by putting `cat(past, new)` where a layer's keys and values were made
(peftc.capture.cached_call); that is only sound where everything between them and the attention is a
view and the attention itself takes keys of any length. Two attentions are recognized:

- SDPA: `aten.scaled_dot_product_attention` (or peftc.ir.causal_attention.attention, which a pass puts
  in its place), keys and values its arguments 1 and 2, its mask argument 3, read through
  `mask_unless_causal` where that pass put it: transformers' boolean 4-D mask.
- eager (transformers' `eager_attention_forward`, `attn_implementation="eager"`):
  `matmul(query, keys^T)`, scaled by constants, plus the mask, softmax over the keys, casts and dropout,
  `matmul(weights, values)`; keys the first matmul's argument 1 (through the transpose, a view), values
  the second's. Its mask is the float additive one transformers' eager_mask makes from the boolean one
  (`where(mask, 0, min)`). No op of that chain takes a size, so the scores and weights follow the keys'
  length; the weights may also be a graph output (output_attentions), and nothing else may read them.

A softmax that is not such a chain (a router's, GPT-2's reordered baddbmm attention) is no site: keys
that reach it are not read by a recognized attention, and the derivation refuses them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node

from peftc.ir.causal_attention import attention, mask_unless_causal

aten = torch.ops.aten
SDPA = (aten.scaled_dot_product_attention.default, attention)
SDPA_MASK_ARG = 3  # attn_mask's position in SDPA's schema (and causal_attention.attention's)
SOFTMAX = (aten.softmax.int, aten._softmax.default)
SCALES = (aten.mul.Tensor, aten.div.Tensor)  # by a constant: GPT-2's and LLaMA's `* scaling`
# what may stand between the softmax and the matmul with the values: casts to the values' dtype, dropout
WEIGHT_OPS = (aten.to.dtype, aten._to_copy.default, aten.dropout.default, aten.clone.default,
              aten.contiguous.default, aten.alias.default)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One attention: the nodes reading its keys and values, each with the argument position it takes them at
    (`reads`), and the mask it reads (`mask`; None where it takes none). `additive`: eager's float mask."""

    reads: tuple[tuple[Node, int], ...]
    mask: Node | None
    additive: bool
    nodes: frozenset[Node]  # the site's own nodes that may read the mask


def attention_sites(graph: Graph) -> list[AttentionSite]:
    """Every recognized attention in `graph`, in graph order."""
    sites = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        site = _sdpa_site(node) if node.target in SDPA else _eager_site(node) if node.target in SOFTMAX else None
        if site is not None:
            sites.append(site)
    return sites


def _sdpa_site(node: Node) -> AttentionSite:
    mask = node.args[SDPA_MASK_ARG] if len(node.args) > SDPA_MASK_ARG else node.kwargs.get("attn_mask")
    reader = node
    if isinstance(mask, Node) and mask.target is mask_unless_causal:
        reader, mask = mask, mask.args[0]
    return AttentionSite(((node, 1), (node, 2)), mask if isinstance(mask, Node) else None, False,
                         frozenset({reader}))


def _eager_site(softmax: Node) -> AttentionSite | None:
    """The eager attention whose softmax is `softmax`, or None where the chain around it is not eager's."""
    scores = softmax.args[0]
    if not _over_last_dim(softmax) or not _only_use(scores, softmax) or scores.target is not aten.add.Tensor:
        return None
    masked = _product_and_mask(scores)
    values_reader = _values_reader(softmax)
    if masked is None or values_reader is None:
        return None
    keys_reader, mask = masked
    return AttentionSite(((keys_reader, 1), (values_reader, 1)), mask, True, frozenset({scores}))


def _product_and_mask(scores: Node) -> tuple[Node, Node] | None:
    """`scores` = scaled `matmul(query, keys^T)` + a float 4-D mask, in either order: the matmul and the mask."""
    first, second = scores.args[:2]
    for product, mask in ((first, second), (second, first)):
        keys_reader = _unscaled(product, scores)
        if keys_reader is not None and isinstance(mask, Node) and _is_float_4d(mask):
            return keys_reader, mask
    return None


def _unscaled(node, user: Node) -> Node | None:
    """The `matmul(query, keys^T)` that `node` is, scaled by constants only, each op read by the next alone."""
    while isinstance(node, Node) and node.target in SCALES and _only_use(node, user):
        if any(isinstance(arg, Node) for arg in node.args[1:]):
            return None
        node, user = node.args[0], node
    is_product = isinstance(node, Node) and node.target is aten.matmul.default and _only_use(node, user)
    return node if is_product else None


def _values_reader(softmax: Node) -> Node | None:
    """The `matmul(weights, values)` the softmax's weights reach through WEIGHT_OPS; the weights may also be
    returned (output_attentions), nothing else may read them."""
    node = softmax
    while True:  # each turn one op further along the chain
        readers = [user for user in node.users if user.target is aten.matmul.default and user.args[0] is node]
        chain = [user for user in node.users if user.target in WEIGHT_OPS and user.args[0] is node]
        others = [user for user in node.users if user not in readers + chain and user.op != "output"]
        if others or len(readers) + len(chain) != 1:
            return None
        if readers:
            return readers[0]
        node = chain[0]


def _over_last_dim(softmax: Node) -> bool:
    value = softmax.meta.get("val")
    dim = softmax.args[1] if len(softmax.args) > 1 else None
    return isinstance(value, torch.Tensor) and value.dim() == 4 and dim in (-1, 3)


def _only_use(node, user: Node) -> bool:
    return isinstance(node, Node) and list(node.users) == [user]


def _is_float_4d(node: Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() == 4 and value.dtype.is_floating_point

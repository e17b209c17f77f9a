"""Attention that drops a mask which only says "causal", as transformers does in eager mode.

A captured graph cannot know whether a call pads its rows, so transformers' mask code traced
by torch.export always builds a boolean [batch, 1, q, k] mask, and every
`scaled_dot_product_attention` converts it to an additive float mask of its own and saves
that for backward: one [batch, 1, q, k] float tensor per layer. Eager transformers looks at
the padding mask instead, and with no padding calls SDPA with `is_causal=True` and no mask.

`mask_unless_causal(mask)` makes that decision at run time, once per forward, on the mask
itself: None when the mask is exactly the lower triangle (what `is_causal=True` computes),
the mask otherwise. `attention(...)` takes the same arguments as
`aten.scaled_dot_product_attention` and runs it causally, unmasked, when it gets None.

Eager attention (transformers' `attn_implementation="eager"`: matmul, + mask, softmax, matmul) adds a
float mask to its scores; a cached graph derived for it reads its mask input through `additive_mask`
(peftc.capture.cached_call).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def mask_unless_causal(mask: torch.Tensor) -> torch.Tensor | None:
    """None if the boolean `mask` [..., q, q] keeps exactly the causal lower triangle, else `mask`."""
    # Reading the mask's values would break a torch.compile graph; compiled code keeps the mask.
    if torch.compiler.is_compiling() or mask.dtype != torch.bool or mask.dim() < 2:
        return mask
    q, k = mask.shape[-2:]
    if q != k or q < 2:  # one query row: is_causal would mean "see only the first key"
        return mask
    causal = torch.ones(q, k, dtype=torch.bool, device=mask.device).tril_()
    return None if torch.equal(mask, causal.expand(mask.shape)) else mask


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              kv_repeats=1):
    """aten.scaled_dot_product_attention, causal and unmasked when `mask_unless_causal` dropped the mask.

    `kv_repeats` > 1: `key` and `value` hold the key/value heads before transformers' `repeat_kv`
    (grouped-query attention). Unmasked, SDPA reads them as they are (`enable_gqa`, as eager
    transformers does without a mask), so no repeated copy is made and saved; masked, they are
    repeated as repeat_kv does, since fused kernels fall back to the math one on a masked GQA call.
    """
    if attn_mask is None:
        return aten.scaled_dot_product_attention.default(query, key, value, None, dropout_p, True, scale=scale,
                                                         enable_gqa=enable_gqa or kv_repeats > 1)
    if kv_repeats > 1:
        key, value = repeat_kv(key, kv_repeats), repeat_kv(value, kv_repeats)
    return aten.scaled_dot_product_attention.default(query, key, value, attn_mask, dropout_p, is_causal,
                                                     scale=scale, enable_gqa=enable_gqa)


def repeat_kv(heads: torch.Tensor, repeats: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * repeats, seq, dim], each head `repeats` times in a row."""
    batch, kv_heads, seq, dim = heads.shape
    return heads[:, :, None].expand(batch, kv_heads, repeats, seq, dim).reshape(batch, kv_heads * repeats, seq, dim)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float mask eager attention adds to its scores, in `dtype`: `mask` itself where it is one
    (transformers' eager_mask made it, for a model configured eager), else made from the boolean `mask`
    as eager_mask makes it: 0 where a key is attended to, the dtype's minimum where not."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)

"""Prefix tuning on a model with chunked attention: calls longer than a chunk are refused.

HF PEFT's prefix tuning puts the N prefix keys and values in the KV cache before the tokens, at cache
positions 0..N-1. A sliding-window layer hides them from late queries, which the prefix pass applies
(passes/insert_prefix.py: `_prefix_in_window`, from the layers' windows). A chunked-attention layer
(Llama 4's `attention_chunk_size`) attends within blocks of the cache instead, which moves the real
tokens' chunk boundaries by N; the pass does not model that, so it equals PEFT only while the prefix and
the tokens fit in one chunk (N + L <= chunk), and a longer call raises NotImplementedError instead of
returning logits that are not PEFT's.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.capture.cache_points import cache_argument


def prefix_tokens(spec) -> int:
    """N: the prefix keys per attention op the spec's prefix entries add."""
    return sum(entry.num_tokens for entry in getattr(spec, "adapters", ()) if getattr(entry, "method", "") == "prefix")


def attention_chunk(model: nn.Module) -> int | None:
    """The chunk `model`'s chunked-attention layers attend within, or None."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    chunk = getattr(config.get_text_config(decoder=True), "attention_chunk_size", None)
    return int(chunk) if chunk is not None else None


def limits_call_length(model: nn.Module, spec) -> bool:
    """Whether `check_prefix_window` can refuse any call of `model` compiled with `spec` (a prefix on a model
    with chunked attention): fixed at compile time, so a compiled model asks once, not every call."""
    return prefix_tokens(spec) > 0 and attention_chunk(model) is not None


def check_prefix_window(model: nn.Module, spec, length: int, where: str = "this call") -> None:
    """Raise where `length` tokens (the cache's included) plus the prefix exceed the model's attention chunk."""
    tokens = prefix_tokens(spec)
    chunk = attention_chunk(model) if tokens else None
    if chunk is not None and tokens + length > chunk:
        raise NotImplementedError(
            f"prefix tuning on {type(model).__name__}, whose chunked-attention layers attend within chunks of {chunk} "
            f"positions: {where} has {length} tokens, which with the {tokens} prefix tokens exceed a chunk. HF PEFT's "
            "prefix moves the chunk boundaries and peftc's prefix pass does not model chunks, so the logits would not "
            f"be PEFT's. Keep calls to {chunk - tokens} tokens or fewer")


def call_length(kwargs: dict) -> int:
    """The tokens a (bound) call attends over: its mask's length, else its new tokens plus the cache's."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.shape[1])
    main = kwargs.get("input_ids")
    if not isinstance(main, torch.Tensor):
        main = kwargs.get("inputs_embeds")
    new = int(main.shape[1]) if isinstance(main, torch.Tensor) and main.dim() >= 2 else 0
    cache = cache_argument(kwargs)
    return new + (int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0)

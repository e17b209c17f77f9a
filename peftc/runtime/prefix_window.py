"""Prefix tuning on a model with sliding-window layers: calls longer than the window are refused.

HF PEFT's prefix tuning puts the N prefix keys and values in the KV cache before the tokens, at cache
positions 0..N-1, so a sliding-window layer (Mistral, Gemma 2/3's local layers, window W) hides them
from a query at position N + i once N + i - j >= W: late queries lose the prefix. peftc's prefix pass
(passes/insert_prefix.py) keeps every prefix key visible to every query (the mask it widens has no
positions to apply the window to), which equals PEFT while N + L <= W for L tokens (cache included)
and differs after. Until the pass applies the window, a call past it raises NotImplementedError
instead of returning logits that are not PEFT's.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.capture.cache_points import cache_argument


def prefix_tokens(spec) -> int:
    """N: the prefix keys per attention op the spec's prefix entries add."""
    return sum(entry.num_tokens for entry in getattr(spec, "adapters", ()) if getattr(entry, "method", "") == "prefix")


def attention_window(model: nn.Module) -> int | None:
    """The smallest window a layer of `model` attends within (sliding or chunked), or None: all full attention."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return None
    config = config.get_text_config(decoder=True)
    types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None)
    windows = []
    if sliding is not None and (types is None or any(kind != "full_attention" for kind in types)):
        windows.append(int(sliding))
    if getattr(config, "attention_chunk_size", None) is not None:
        windows.append(int(config.attention_chunk_size))
    return min(windows) if windows else None


def check_prefix_window(model: nn.Module, spec, length: int, where: str = "this call") -> None:
    """Raise where `length` tokens (the cache's included) plus the prefix exceed the model's window."""
    tokens = prefix_tokens(spec)
    window = attention_window(model) if tokens else None
    if window is not None and tokens + length > window:
        raise NotImplementedError(
            f"prefix tuning on {type(model).__name__}, whose sliding-window layers attend within {window} positions: "
            f"{where} has {length} tokens, which with the {tokens} prefix tokens exceed the window. HF PEFT's prefix "
            "falls out of the window for the later queries and peftc's keeps it visible (passes/insert_prefix.py does "
            f"not apply the window yet), so the logits would not be PEFT's. Keep calls to {window - tokens} tokens "
            "or fewer, or use a config with a larger sliding_window")


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

"""Banks of virtual tokens: every served prompt-tuning and prefix-tuning adapter, stacked so one op serves every row.

A batch row's adapter may add N virtual tokens (prompt tuning: N embeddings before its tokens)
or N virtual keys and values at every attention op (prefix tuning); N differs per adapter and
the base adds none. Rows keep one shape by giving every row the bank's largest N, `width`:
row k's own N tokens are the *last* N of those slots and the first width - N are padding its
attention mask hides, the left padding transformers uses for decoder-only batches. Each bank
holds one slot row per adapter plus a last row of padding for the base (id -1 indexes it), and
`lengths` [n+1] (int64): each row's own N, and `slots` = arange(width), from which the passes
build masks and positions.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.errors import CheckpointError
from peftc.ir.lora_bank import ServedAdapter


class PromptBank(nn.Module):
    """embedding [n+1, width, dim]: adapter k's prompt right-aligned in row k, zeros elsewhere."""

    def __init__(self, path: str, adapters: list[ServedAdapter], like: torch.Tensor):
        super().__init__()
        prompts = [_part(a, path, "prompt") for a in adapters]
        width = max(p.shape[0] for p in prompts if p is not None)
        dims = {p.shape[1] for p in prompts if p is not None}
        if dims != {like.shape[1]}:
            raise CheckpointError(f"prompt adapters at {path!r} have embedding sizes {sorted(dims)}, the model's "
                                  f"embedding has {like.shape[1]}; was one trained on another model?")
        embedding = torch.zeros(len(prompts) + 1, width, like.shape[1], dtype=like.dtype, device=like.device)
        for k, prompt in enumerate(prompts):
            if prompt is not None:
                embedding[k, width - prompt.shape[0]:] = prompt
        self.register_buffer("embedding", embedding)
        self.register_buffer("lengths", _lengths(prompts, like.device))
        self.register_buffer("slots", torch.arange(width, device=like.device))


class PrefixBank(nn.Module):
    """key, value [n+1, kv_heads, width, head_dim] at one attention op, right-aligned as PromptBank's."""

    def __init__(self, path: str, adapters: list[ServedAdapter], like: torch.Tensor):
        super().__init__()
        prefixes = [_part(a, path, "prefix") for a in adapters]
        given = [p for p in prefixes if p is not None]
        width = max(p.key.shape[1] for p in given)
        layouts = {(p.key.shape[0], p.key.shape[2]) for p in given}
        if len(layouts) != 1:
            raise CheckpointError(f"prefix adapters at {path!r} have (kv heads, head dim) {sorted(layouts)}; "
                                  "were they trained on different models?")
        kv, dim = layouts.pop()
        factory = dict(dtype=like.dtype, device=like.device)
        key = torch.zeros(len(prefixes) + 1, kv, width, dim, **factory)
        value = torch.zeros_like(key)
        for k, prefix in enumerate(prefixes):
            if prefix is not None:
                n = prefix.key.shape[1]
                key[k, :, width - n:], value[k, :, width - n:] = prefix.key, prefix.value
        self.register_buffer("key", key)
        self.register_buffer("value", value)
        self.register_buffer("lengths", _lengths([None if p is None else p.key for p in prefixes], like.device,
                                                 dim=1))
        self.register_buffer("slots", torch.arange(width, device=like.device))


def _part(adapter: ServedAdapter, path: str, name: str):
    site = adapter.sites.get(path)
    return None if site is None else getattr(site, name)


def _lengths(tensors: list, device, dim: int = 0) -> torch.Tensor:
    """Each adapter's own N (0 where it has none), then the base's 0."""
    return torch.tensor([0 if t is None else t.shape[dim] for t in tensors] + [0], dtype=torch.long, device=device)

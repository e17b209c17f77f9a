"""PEFT's prefix table <-> peftc's per-attention key/value prefixes.

PEFT saves one `prompt_embeddings` [N, layers·2·kv_heads·head_dim]; viewed as [N, layers·2, kv, d]
and permuted to [layers·2, kv, N, d], row 2l is layer l's keys and 2l+1 its values. peftc keeps
`<attention path>.prefix.key` / `.value` [kv, N, d], one pair per attention op in graph order,
named by peft_keys as `base_model.model.<path>.prefix_key` / `.prefix_value` (keys PEFT never writes).
"""

from __future__ import annotations

import torch

from peftc.errors import CheckpointError

TABLE = "prompt_embeddings"


def _layer_keys(names: dict[str, str]) -> list[tuple[str, str]]:
    """(key, value) PEFT-side names per attention op, in graph order."""
    keys = [k for n, k in names.items() if n.endswith(".key") and k.endswith(".prefix_key")]
    return [(k, k[: -len("prefix_key")] + "prefix_value") for k in keys]


def split_table(names: dict[str, str], shapes: dict[str, tuple], tensors: dict) -> dict:
    """Replace PEFT's prompt_embeddings by one key and one value tensor per attention op."""
    layers = _layer_keys(names)
    if not layers or TABLE not in tensors:
        return tensors
    table = tensors[TABLE]
    kv, n, d = shapes[layers[0][0]]
    if table.dim() != 2 or table.shape[0] != n or table.shape[1] != len(layers) * 2 * kv * d:
        raise CheckpointError(f"tensor {TABLE!r}: checkpoint shape {tuple(table.shape)} != model shape "
                              f"{(n, len(layers) * 2 * kv * d)} ({len(layers)} attention layers x key, value x "
                              f"{kv} heads x {d})")
    rows = table.view(n, len(layers) * 2, kv, d).permute(1, 2, 0, 3)
    out = {k: v for k, v in tensors.items() if k != TABLE}
    for index, (key, value) in enumerate(layers):
        out[key], out[value] = rows[2 * index].contiguous(), rows[2 * index + 1].contiguous()
    return out


def join_table(names: dict[str, str], tensors: dict) -> dict:
    """The inverse: per-op keys/values back into PEFT's one prompt_embeddings table."""
    layers = _layer_keys(names)
    if not layers:
        return tensors
    rows = [tensors.pop(k) for pair in layers for k in pair]  # [kv, N, d] each
    stacked = torch.stack(rows).permute(2, 0, 1, 3)  # [N, layers·2, kv, d]
    return {**tensors, TABLE: stacked.reshape(stacked.shape[0], -1).contiguous()}

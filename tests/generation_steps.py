"""Call a Generator's prefill and decode graphs as generate() does, for logit-level comparisons."""

from __future__ import annotations

import torch

CACHE_SLOTS = 32


def prefill_and_step(generator, ids, mask, extra: dict, position_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position prefill logits, logits of one greedy decode step). Positions count the tokens
    `position_mask` marks (the attention mask unless given: prompt rows count their slots too)."""
    position_mask = mask if position_mask is None else position_mask
    batch, seq = ids.shape
    graphs = generator.graphs_for(batch, CACHE_SLOTS)
    full = torch.ones(batch, CACHE_SLOTS, dtype=torch.long)
    full[:, :seq] = mask
    positions = (position_mask.cumsum(-1) - 1).masked_fill(position_mask == 0, 1)
    with torch.no_grad():
        prefill = graphs.prefill(input_ids=ids, attention_mask=full, position_ids=positions,
                                 cache_position=torch.arange(seq), **extra)[:, -1]
        token = prefill.argmax(-1, keepdim=True)
        step = graphs.decode(input_ids=token, attention_mask=full, position_ids=positions[:, -1:] + 1,
                             cache_position=torch.tensor([seq]), **extra)[:, -1]
    return prefill, step

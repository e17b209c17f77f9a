"""Call a Generator's prefill and decode graphs as generate() does, or a model forward by forward with its
KV cache as a greedy decoding loop does, for logit-level comparisons."""

from __future__ import annotations

import torch

from peftc.runtime.generate import MIN_CACHE_LEN, Generator

CACHE_SLOTS = MIN_CACHE_LEN  # the cache generate() gives a short prompt and its new tokens


def generator_of(model):
    """The Generator a compiled or served model's generate() keeps, made as generate() makes it if there is
    none yet: a check of its graphs beside a generate() call of the same batch size captures no graphs more
    (each new Generator exports its own prefill and decode graphs) and reads the graphs generate() runs."""
    if model._generator is None:
        model._generator = Generator(model.compilation, model.plan)
    return model._generator


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


def greedy_cached_calls(model, ids, mask, steps: int, **kwargs) -> list[tuple]:
    """The prompt with use_cache=True, then `steps` greedy steps continuing its cache, each step's mask over the
    caller's tokens: [(call's output, whole sequence, its mask)] per call. `kwargs` go to every call (adapter_ids).
    One cache, updated in place: after the last call it holds every step's."""
    out = model(ids, attention_mask=mask, use_cache=True, **kwargs)
    calls = [(out, ids, mask)]
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        out = model(token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True, **kwargs)
        calls.append((out, ids, mask))
    return calls

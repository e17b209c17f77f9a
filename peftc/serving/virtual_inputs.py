"""The call a served model with prompt or prefix adapters runs: explicit attention mask and positions.

Rows of prompt- and prefix-tuning adapters see a different number of virtual tokens each, so
the served graph builds each row's mask and positions itself (lower_prompt_multi,
lower_prefix_multi) from the ones it is given: every call passes `attention_mask` (ones where
the caller gave none) and `position_ids` 0..S-1 per row, as the model computes them when
called without. Explicit position_ids are refused, as compiling prompt tuning refuses them.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.capture.binding import bind_call, forward_signature
from peftc.capture.calls import is_hf_model
from peftc.errors import SpecError

NEEDED = ("input_ids", "attention_mask", "position_ids")


def with_virtual_inputs(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """(args, kwargs) as keywords, with the attention_mask and position_ids the served graph reads."""
    parameters = forward_signature(model).parameters
    if not is_hf_model(model) or any(name not in parameters for name in NEEDED):
        raise SpecError(f"serving prompt or prefix adapters takes a transformers model whose forward accepts "
                        f"{list(NEEDED)}; {type(model).__name__} does not")
    args, kwargs = bind_call(model, args, kwargs)
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SpecError("input_ids: serving prompt or prefix adapters needs token ids [batch, seq] (each row's "
                        "virtual tokens go before its own)")
    if "position_ids" in kwargs:
        raise NotImplementedError("position_ids: served prompt and prefix adapters place each row's positions "
                                  "themselves; call without position_ids (compiling prompt tuning refuses them too)")
    batch, seq = ids.shape
    mask = kwargs.get("attention_mask")
    positions = torch.arange(seq, device=ids.device).unsqueeze(0).repeat(batch, 1)
    return args, {**kwargs, "attention_mask": torch.ones_like(ids) if mask is None else mask,
                  "position_ids": positions}


def with_cached_positions(model: nn.Module, kwargs: dict) -> dict:
    """A cached call (bound keywords) with the position_ids a served prefix graph reads: past..past+S-1 for every
    row, as the model counts them from the cache length when called without (the graph adds each prefix row's
    N; padding does not count, as in the model's own cached call)."""
    if "position_ids" in kwargs:
        raise NotImplementedError("position_ids: served prefix adapters place each row's positions themselves; "
                                  "call without position_ids (compiling prefix tuning shifts them too)")
    main = next(kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None)
    cache = next((kwargs[k] for k in ("cache", "past_key_values") if kwargs.get(k) is not None), None)
    past = cache.get_seq_length() if cache is not None else 0
    batch, seq = main.shape[:2]
    positions = torch.arange(past, past + seq, device=main.device).unsqueeze(0).repeat(batch, 1)
    return {**kwargs, "position_ids": positions}


def with_prompt_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, slot_lengths: torch.Tensor,
                      width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A generation prompt with `width` slots before each row's tokens, its own N of them (the last N)
    visible in the mask: what the served generation graphs read their prompts into. Returns (ids,
    attention mask, position mask): a prompt row's positions count its padding, as its own compiled
    model's (and HF PEFT's) do; the other rows' count real tokens only, as transformers' generate.

    `slot_lengths` [batch]: each row's number of virtual tokens (0 for rows without a prompt)."""
    batch = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    lengths = slot_lengths.to(input_ids.device)
    slots = torch.arange(width, device=input_ids.device)
    visible = (slots[None, :] >= (width - lengths)[:, None]).to(attention_mask.dtype)
    ids = torch.cat([input_ids.new_zeros(batch, width), input_ids], 1)
    counted = torch.where((lengths > 0)[:, None], torch.ones_like(attention_mask), attention_mask)
    return ids, torch.cat([visible, attention_mask], 1), torch.cat([visible, counted], 1)

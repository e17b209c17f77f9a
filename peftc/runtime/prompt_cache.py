"""Forward calls with a KV cache on models that prepend virtual tokens (prompt tuning, p-tuning), compiled or served.

    out = cm(ids, attention_mask=mask, use_cache=True)     # the virtual tokens, then ids: N + S logits and cache entries
    step = cm(token, attention_mask=torch.cat([mask, ones], 1), past_key_values=out.past_key_values, use_cache=True)

What HF PEFT does (peft 0.21.2). Its generate() prepares each step (`prepare_inputs_for_generation`):
the virtual tokens go in front of the input only while the cache is empty, so they enter the cache once,
and every step's 2-D mask is the caller's (over their own tokens) with N ones prepended. Its forward
prepends the N virtual tokens (and N ones to the mask) on *every* call, a cache passed or not: a manual
loop continuing a cache puts them in a second time, and the step's logits are no longer those of the
whole sequence (about 0.07 apart on the tests' LLaMA). peftc does what generate() does, for forward calls:

- the call that starts a cache (none passed, or an empty one) puts the virtual tokens first: its logits
  and the cache it returns cover N + S positions, as PEFT's forward returns them;
- a call continuing a cache adds none: its logits are the new tokens', equal to PEFT's over the whole
  sequence, and the cache grows by the new tokens only.

The mask a continued call passes may cover the caller's tokens (what the first call was given plus every
token since: cache length - N + new tokens), as PEFT takes it, or the whole cache plus the new tokens
(extended by the virtual tokens). The virtual tokens' columns are the model's own either way: a row sees
its own N. Any other length is refused, naming both.

How: as generation does (peftc.runtime.generate), the call's ids get N slots in front on the first call,
and its graph takes `cache_position` (where its tokens sit in the cache): insert_prompt (and, served,
lower_prompt_multi) put the virtual tokens at cache positions below N, and nothing at later ones, so
one graph serves the first call and every continued one. A served model's slots are `width`, the most
virtual tokens any served prompt has; a row's own N are the last N of them (the others hidden, as the
served forward without a cache has them), so every row shares one cache length, width + S, and the
positions, which the call passes, are each row's own: N + t for its t-th token, as its own model counts.
"""

from __future__ import annotations

import torch

from peftc.capture.cache_points import cache_argument

CACHE_POSITION = "cache_position"  # the graph input insert_prompt and lower_prompt_multi read
IGNORED_LABEL = -100  # the virtual tokens' labels, as HF PEFT pads them


def prepended_tokens(spec) -> int:
    """How many virtual tokens a compiled model's spec puts before the caller's (prompt tuning, p-tuning)."""
    return sum(getattr(entry, "prepended_tokens", 0) for entry in spec.adapters) if spec is not None else 0


def with_cache_slots(kwargs: dict, slot_lengths: torch.Tensor, width: int, *, positions: bool) -> dict:
    """A cached call (bound, checked keywords) as the graph of a model with `width` virtual-token slots takes it.

    `slot_lengths` [batch]: each row's own number of virtual tokens (width for a compiled model; a served
    row's adapter's, 0 for rows without a prompt). `positions`: pass each row's position_ids (served rows
    count theirs from their own N; a compiled model's are the ones it counts from the cache itself)."""
    _refuse_inputs(kwargs)
    ids = kwargs["input_ids"]
    batch, new = ids.shape
    cache = cache_argument(kwargs)
    past = cache.get_seq_length() if cache is not None else 0
    lengths = slot_lengths.to(ids.device)
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    visible = (torch.arange(width, device=ids.device)[None, :] >= (width - lengths)[:, None]).to(mask.dtype)
    call = dict(kwargs)
    if past == 0:
        if mask.shape[1] != new:
            raise ValueError(f"attention_mask: {list(mask.shape)} for {new} tokens; the call that starts a cache "
                             f"takes a mask over its own tokens, [{batch}, {new}] (the model adds the columns of "
                             f"its {width} virtual tokens)")
        call["input_ids"] = torch.cat([ids.new_zeros(batch, width), ids], 1)
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            call["labels"] = torch.cat([labels.new_full((batch, width), IGNORED_LABEL), labels], 1)
        new += width
    else:
        mask = _caller_columns(mask, past, width, new)
    call["attention_mask"] = torch.cat([visible, mask], 1)
    steps = torch.arange(past, past + new, device=ids.device)
    call[CACHE_POSITION] = steps
    if positions:  # slot j of a row with N tokens is its virtual token j - (width - N); hidden slots sit at 0
        call["position_ids"] = (steps[None, :] - width + lengths[:, None]).clamp_min(0)
    return call


def _caller_columns(mask: torch.Tensor, past: int, width: int, new: int) -> torch.Tensor:
    """A continued call's mask over the caller's tokens only (past - width + new columns)."""
    tokens = past - width + new
    if past < width:
        raise ValueError(f"cache: holds {past} entries, fewer than the {width} virtual-token slots this model's "
                         "first call puts there; pass the cache this model returned (out.past_key_values)")
    if mask.shape[1] == tokens:
        return mask
    if mask.shape[1] == past + new:  # extended by the virtual tokens: their columns are the model's
        return mask[:, width:]
    if mask.shape[1] == new and bool(mask.all()):  # bind_call's stand-in for a call passing no mask
        return mask.new_ones(mask.shape[0], tokens)
    raise ValueError(f"attention_mask: {list(mask.shape)}; continuing a cache of {past} entries ({width} virtual-token "
                     f"slots, then {past - width} of your tokens) with {new} new tokens takes a mask over your tokens, "
                     f"[{mask.shape[0]}, {tokens}] (as HF PEFT takes it), or over the whole cache, "
                     f"[{mask.shape[0]}, {past + new}]")


def _refuse_inputs(kwargs: dict) -> None:
    if kwargs.get("input_ids") is None or kwargs.get("inputs_embeds") is not None:
        raise NotImplementedError("inputs_embeds with a KV cache on a model with prompt-tuning (or p-tuning) adapters: "
                                  "its virtual tokens go in at the token embedding; pass input_ids, or use_cache=False")
    if kwargs.get("position_ids") is not None:
        raise NotImplementedError("position_ids: prompt-tuning (and p-tuning) adapters place the positions themselves "
                                  "(HF PEFT ignores them too); call without position_ids")

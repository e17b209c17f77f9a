"""Cached-forward graphs derived from the compile's superset capture, checked once per model before use.

peftc.capture.cached_call turns the superset graph into a graph that takes each layer's past keys and
values, the attention mask and the positions; this module makes those two inputs per call as the
original makes them for a call with a cache, and decides once per compiled model whether derived
graphs may run at all:

- the mask: transformers' own `create_causal_mask` on the call's padding mask (past and new tokens)
  and the cache as it is before the call (its length sets the query offset), with the skip to
  SDPA's `is_causal` turned off (a graph input is a tensor; `mask_unless_causal` in the graph still
  drops a mask that is only causal). It is the mask the model's attention takes: boolean for SDPA,
  for eager attention the float one eager_mask makes (0 or the dtype's minimum, in the embeddings'
  dtype, as inputs_embeds would be). A model with sliding-window layers (Mistral with sliding_window,
  Gemma 3, Qwen2/3 with layer_types) gets a second mask for those, create_sliding_window_causal_mask's
  (config.sliding_window): the cache keeps every position (tensor_cache.full_attention_cache) and the
  mask applies the window. Chunked (Llama 4) and bidirectional attention, and softcapped attention
  logits (Gemma 2), capture instead (cached_call.layer_kinds);
- the positions, where the call passes none: `past + arange(new)`, as transformers counts them.

The gate, `holds`: on a small left-padded call (a prompt of four tokens, then a step of two continuing
its cache), the derived graph's logits at every real token must equal, to GATE_TOLERANCE, those of the
superset graph itself over the whole sequence, without a cache (the graph every plain signature is
derived from, which the tests compare to PEFT). That checks what the graph surgery cannot see (a model that counts positions or
lengths from its cache, a mask eager attention adds that is not eager_mask's), with this model's own
adapters. A model it refuses captures its cached graphs as before.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.fx import GraphModule

from peftc.capture.cache_points import KEYS, VALUES
from peftc.capture.cached_call import (
    MASK_INPUTS,
    POSITIONS,
    SLIDING,
    Derived,
    derive_cached_graph,
    layer_kinds,
)
from peftc.capture.calls import CallSignature
from peftc.capture.input_defaults import EMBEDS_INPUT, MAIN_INPUT
from peftc.capture.superset import ExtraInputs
from peftc.ir.modes import set_mode
from peftc.runtime.kv_cache import head_dim, kv_heads
from peftc.runtime.tensor_cache import fill, full_attention_cache

GATE_SEGMENTS = (4, 2)  # the check's prompt, then a continued step (new tokens each)
GATE_PADDING = 2  # the second row's left padding
# The logits' largest difference the check allows, relative to their largest magnitude (at least 1): rounding
# of other matmul shapes (float32: about 1e-7 in practice), far below what a wrong position or mask gives.
GATE_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}
HALF_TOLERANCE = 1e-2  # float16 / bfloat16 bases


class CacheDerivation:
    """Derives the cached graphs of one compiled model from its superset graph, once the gate passed."""

    def __init__(self, model: nn.Module, superset: tuple[tuple, dict], flat: GraphModule,
                 gate_inputs: dict | None = None):
        self.model, self.flat = model, flat
        self.gate_inputs = gate_inputs or {}  # the graphs' inputs besides the model's, for the check's 2 rows
        self.superset_call = superset
        self.superset = CallSignature.of(*superset)
        self.config = model.config.get_text_config(decoder=True)
        self.kinds = layer_kinds(self.config)
        self._holds: bool | None = None
        self._checked: dict[CallSignature, Derived] = {}  # the gate's graph, for the call of its signature

    def derive(self, inputs: dict) -> Derived | None:
        """The graph for a cached call passing `inputs` (besides the cache), or None: the caller captures."""
        if self.kinds is None or not self.holds():
            return None
        checked = self._checked.pop(CallSignature.of((), inputs), None)
        return checked or derive_cached_graph(self.flat, self.superset, inputs, self.model, self.kinds)

    def holds(self) -> bool:
        if self._holds is None:
            self._holds = self._check()
        return self._holds

    @torch.no_grad()
    def _check(self) -> bool:
        ids, mask = gate_call(self.config, _device(self.model))
        inputs = {MAIN_INPUT: ids, "attention_mask": mask}
        derived = derive_cached_graph(self.flat, self.superset, inputs, self.model, self.kinds)
        whole_call = self._superset_like(inputs)
        if derived is None or whole_call is None:
            return False
        set_mode(derived.graph_module, False)
        set_mode(self.flat, False)  # derived graphs set their own mode before they run
        try:
            whole = self.flat(**whole_call, **self.gate_inputs).logits
            stepped = torch.cat(list(self._steps(derived.graph_module, ids, mask)), 1)
        except Exception:  # noqa: BLE001  a graph the model's cache cannot feed (its past's shape): capture
            return False
        real = mask.bool()
        holds = bool(torch.isfinite(whole[real]).all()) and _close(stepped[real], whole[real])
        if holds:
            self._checked[CallSignature.of((), inputs)] = derived
        return holds

    def _superset_like(self, inputs: dict) -> dict | None:
        """The superset call over `inputs`: its flags as captured, stand-ins for its other tensors (labels like
        the ids, default positions), so the superset graph itself is the whole-sequence reference."""
        _, captured = self.superset_call
        given = {**ExtraInputs.of(self.model)(inputs), **inputs}
        given.update({name: value for name, value in captured.items() if not isinstance(value, torch.Tensor)})
        return {name: given[name] for name in captured} if all(name in given for name in captured) else None

    def _steps(self, gm: GraphModule, ids: torch.Tensor, mask: torch.Tensor):
        """The derived graph's logits over `ids`, GATE_SEGMENTS tokens a call, each continuing the last's cache."""
        cache = full_attention_cache(self.config)
        keys, values = empty_past(self.model, ids.shape[0])
        start = 0
        for width in GATE_SEGMENTS:
            inputs = {MAIN_INPUT: ids[:, start:start + width], "attention_mask": mask[:, :start + width]}
            extra = derived_inputs(self.model, inputs, cache, start)
            result = gm(past_keys=list(keys), past_values=list(values), **{**inputs, **extra}, **self.gate_inputs)
            keys, values = result[KEYS], result[VALUES]
            fill(cache, keys, values)
            start += width
            yield result["output"].logits




def _close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    scale = max(1.0, float(reference.abs().max()))
    return float((ours - reference).abs().max()) <= GATE_TOLERANCE.get(reference.dtype, HALF_TOLERANCE) * scale


def derived_inputs(model: nn.Module, inputs: dict, cache, past: int) -> dict:
    """What a derived graph takes besides the call's inputs: the positions (when the call passes none) and
    the mask, as the original computes them for a call continuing `cache` (`past` tokens long; not yet
    updated with this call's tokens)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    main = inputs.get(MAIN_INPUT)
    main = main if main is not None else inputs[EMBEDS_INPUT]
    batch, new = main.shape[:2]
    positions = inputs.get(POSITIONS)
    if positions is None:
        positions = torch.arange(past, past + new, device=main.device).unsqueeze(0)
    if positions.shape[0] == 1 and batch > 1:
        positions = positions.expand(batch, -1)
    config = model.config.get_text_config(decoder=True)
    dtype = model.get_input_embeddings().weight.dtype  # what inputs_embeds would be: the eager mask's dtype
    shaped = torch.empty(batch, new, 0, dtype=dtype, device=main.device)  # create_causal_mask reads its sizes
    made = {}
    for kind in set(layer_kinds(config) or ()):  # the cache's layers are full ones: the window is the mask's
        create = create_sliding_window_causal_mask if kind == SLIDING else create_causal_mask
        made[MASK_INPUTS[kind]] = create(config=config, inputs_embeds=shaped, attention_mask=inputs.get("attention_mask"),
                                         cache=cache, position_ids=positions, allow_is_causal_skip=False)
    return {POSITIONS: positions, **made}


def gate_call(config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The check's token ids [2, sum(GATE_SEGMENTS)] and padding mask (the second row left-padded)."""
    length = sum(GATE_SEGMENTS)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :GATE_PADDING] = 0
    return ids, mask


def empty_past(model: nn.Module, batch: int, length: int = 0) -> tuple[list, list]:
    """Each layer's past keys and values for `batch` rows, `length` long (zeros), as a cached graph takes them."""
    config = model.config.get_text_config(decoder=True)
    weight = next(model.parameters())
    shape = (batch, kv_heads(config), length, head_dim(config))
    layers = range(config.num_hidden_layers)
    return [weight.new_zeros(shape) for _ in layers], [weight.new_zeros(shape) for _ in layers]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device

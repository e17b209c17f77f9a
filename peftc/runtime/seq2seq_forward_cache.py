"""Forward calls with a KV cache on encoder-decoders (T5, BART): an EncoderDecoderCache, as the original returns.

    out = cm(input_ids=ids, attention_mask=mask, decoder_input_ids=start, use_cache=True)  # out.past_key_values
    out = cm(encoder_outputs=(out.encoder_last_hidden_state,), attention_mask=mask,
             decoder_input_ids=next_token, past_key_values=out.past_key_values)

As peftc.runtime.forward_cache for causal LMs, graphs take the caches as tensors and return them
(`seq2seq_cache.WithSeq2SeqTensorCache`, captured through the compiled model's own pipeline: same
passes, same adapter parameters), and this module checks the cache a call passes, hands its tensors to
the graph and stores what comes back in an `EncoderDecoderCache` of two DynamicCaches: the one passed,
updated in place as the original updates it, or a new one. The self-attention cache grows by the
call's decoder tokens; the cross-attention cache is filled by the first call (from the encoder output)
and read as it is by every later one, as transformers does (`is_updated`).

One graph per (call signature, with a self-attention past, with cross-attention keys), captured on the
first call of each: the prompt call and the continued steps are two captures (a third where a call
passes `encoder_outputs=` in place of input_ids on the first call). Batch, encoder length, past and
decoder lengths are dynamic, so a signature is captured once whatever the shapes. No graph is derived
from the superset capture here (its graph has no cache points for cross-attention): the first call of
each kind costs one export (benchmarks/RESULTS.md, "Encoder-decoder forward calls with a cache").

A call passing `encoder_outputs` (a BaseModelOutput or tuple, as the original takes) gives its last
hidden state to the graph and gets its fields back in the output as given; input_ids beside it are
ignored, as the original ignores them. What a cached graph here does not take (inputs_embeds,
decoder_inputs_embeds, other tensors, a cache that is not an EncoderDecoderCache of full DynamicCache
layers, virtual tokens, a served model's routing) is refused naming it and the fix.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from peftc.capture.cache_points import CACHE_PARAMETERS, cache_argument
from peftc.capture.calls import CallSignature
from peftc.ir.attribute_owners import alias_attribute_owners
from peftc.ir.modes import set_mode
from peftc.runtime.seq2seq_cache import (CROSS_KEYS, CROSS_VALUES, SELF_KEYS, SELF_VALUES, WithSeq2SeqTensorCache,
                                         head_dim, heads)

ENCODER_INPUTS = ("input_ids", "attention_mask")  # [batch, encoder length]
DECODER_INPUTS = ("decoder_input_ids", "labels")  # [batch, new decoder tokens]
DECODER_TOTAL_INPUTS = ("decoder_attention_mask",)  # [batch, past + new decoder tokens]
ENCODER_STATES = "encoder_hidden_states"  # the graph's input for a call's encoder_outputs
ENCODER_FIELDS = ("encoder_last_hidden_state", "encoder_hidden_states", "encoder_attentions")
SUPPORTED = ENCODER_INPUTS + DECODER_INPUTS + DECODER_TOTAL_INPUTS + ("encoder_outputs", "use_cache") + CACHE_PARAMETERS
# Example sizes for the capture; all different, so that export's duck sizing ties no two dims.
BATCH, ENCODER, NEW, PAST = 2, 6, 3, 5
BATCH_DIM, ENCODER_DIM, PAST_DIM = Dim("batch"), Dim("encoder_length"), Dim("past_length", min=1)


class Seq2SeqCachedForward:
    """The cached-forward graphs of one compiled encoder-decoder (its compilation, under its plan)."""

    def __init__(self, compilation, plan):
        self.compilation = compilation
        # As generation does: the flat graph, no layer calls or checkpointing.
        self.plan = replace(plan, structure_layers=False, checkpoint_layers=False)
        self.source = WithSeq2SeqTensorCache(compilation.source)
        self.graphs: dict[tuple[CallSignature, bool, bool], GraphModule] = {}
        self.modes: dict[GraphModule, bool] = {}
        self.cache_field = "cache"  # the output field holding the cache (the source reads it on capture)

    @property
    def model(self) -> nn.Module:
        return self.compilation.source

    def __call__(self, kwargs: dict, training: bool):
        check_seq2seq_cached_call(self.model, kwargs)
        cache = cache_argument(kwargs)
        inputs = {k: v for k, v in kwargs.items() if k not in CACHE_PARAMETERS and k != "use_cache"}
        encoder_outputs = _encoder_outputs(inputs.pop("encoder_outputs", None))
        if encoder_outputs is not None:
            inputs.pop("input_ids", None)  # the original encodes only without encoder_outputs
            inputs[ENCODER_STATES] = encoder_outputs["last_hidden_state"]
        batch, encoder_len = _encoder_shape(inputs)
        past, cross = cache_tensors(self.model, cache, batch, encoder_len) if cache is not None else (None, None)
        key = (CallSignature.of((), inputs), past is not None, cross is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs, *key[1:])
        gm = self.graphs[key]
        if self.modes.get(gm) is not training:  # set_mode walks the graph: only when the mode changed
            set_mode(gm, training)
            self.modes[gm] = training
        tensors = {}
        if past is not None:
            tensors.update(past_keys=list(past[0]), past_values=list(past[1]))
        if cross is not None:
            tensors.update(cross_keys=list(cross[0]), cross_values=list(cross[1]))
        result = gm(**inputs, **tensors)
        return self._output(result, cache, encoder_outputs)

    def _output(self, result: dict, cache, encoder_outputs: dict | None):
        """The model's output with `cache` (or a new EncoderDecoderCache) holding what the graph returned."""
        from transformers import DynamicCache, EncoderDecoderCache

        from peftc.runtime.tensor_cache import fill

        out = result["output"]
        if SELF_KEYS not in result:  # the original keeps no cache for this call (BART given labels, no cache)
            return out
        if cache is None:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        fill(cache.self_attention_cache, result[SELF_KEYS], result[SELF_VALUES])
        if CROSS_KEYS in result:  # computed by this call: later calls read them (transformers' is_updated)
            fill(cache.cross_attention_cache, result[CROSS_KEYS], result[CROSS_VALUES])
            for i in range(len(result[CROSS_KEYS])):
                cache.is_updated[i] = True
        given = {} if encoder_outputs is None else {
            field: encoder_outputs.get(name) for field, name in
            zip(ENCODER_FIELDS, ("last_hidden_state", "hidden_states", "attentions"))}
        return type(out)(**{**out, **given, self.source.cache_field: cache})  # in the original's field order

    def _capture(self, inputs: dict, with_past: bool, with_cross: bool) -> GraphModule:
        example, shapes = self._example(inputs, with_past, with_cross)
        built = replace(self.compilation, source=self.source).build((), example, self.plan, dynamic_shapes=shapes)
        return alias_attribute_owners(built.graph_module)  # one lookup per parameter read, as generation's graphs

    def _example(self, inputs: dict, with_past: bool, with_cross: bool) -> tuple[dict, dict]:
        """A call like `inputs` at the example sizes, and its dynamic shapes."""
        example, shapes = {}, {}
        new_dim = Dim.AUTO
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                example[name], shapes[name] = value, None  # a flag
                continue
            if name == ENCODER_STATES:
                example[name] = value.new_zeros(BATCH, ENCODER, value.shape[-1]).normal_()
                shapes[name] = {0: BATCH_DIM, 1: ENCODER_DIM, 2: Dim.STATIC}
                continue
            if name in ENCODER_INPUTS:
                width, dim = ENCODER, ENCODER_DIM
            elif name in DECODER_INPUTS:
                width, dim = NEW, new_dim
            else:  # the decoder's padding mask: past and new tokens
                width, dim = (PAST if with_past else 0) + NEW, Dim.AUTO
            example[name] = value.new_ones(BATCH, width) if "mask" in name else value.new_zeros(BATCH, width)
            shapes[name] = {0: BATCH_DIM, 1: dim}
        for wanted, (k_name, v_name), length, dim in ((with_past, ("past_keys", "past_values"), PAST, PAST_DIM),
                                                      (with_cross, ("cross_keys", "cross_values"), ENCODER, ENCODER_DIM)):
            if not wanted:
                continue
            keys, values = empty_layers(self.model, BATCH, length)
            example[k_name], example[v_name] = [k.normal_() for k in keys], [v.normal_() for v in values]
            shapes[k_name] = shapes[v_name] = [{0: BATCH_DIM, 2: dim}] * len(keys)
        return example, shapes


def check_seq2seq_cached_call(model: nn.Module, kwargs: dict) -> None:
    """Refuse a cached call the graphs here cannot run, naming what it passes and the fix."""
    others = sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in SUPPORTED)
    if others:
        raise NotImplementedError(f"a forward with a KV cache on {type(model).__name__} takes {sorted(SUPPORTED)} "
                                  f"(and flags); this call also passes {others}. Pass use_cache=False, or call "
                                  "cm.merge_and_unload() for the original model with every option")
    if kwargs.get("input_ids") is None and kwargs.get("encoder_outputs") is None:
        raise ValueError("a forward with a KV cache on an encoder-decoder needs input_ids [batch, encoder length] "
                         "or encoder_outputs (out.encoder_last_hidden_state of the call that started the cache)")
    if kwargs.get("decoder_input_ids") is None and kwargs.get("labels") is None:
        raise ValueError("a forward with a KV cache on an encoder-decoder needs decoder_input_ids [batch, new "
                         "decoder tokens] (or labels, which the model shifts right into them)")
    for name in ENCODER_INPUTS + DECODER_INPUTS + DECODER_TOTAL_INPUTS:
        value = kwargs.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or value.dim() != 2):
            raise TypeError(f"a forward with a KV cache needs {name} as a 2-D tensor [batch, length]")


def cache_tensors(model: nn.Module, cache, batch: int, encoder_len: int) -> tuple[tuple | None, tuple | None]:
    """The (keys, values) per decoder layer of `cache`'s self-attention and cross-attention caches, each None
    where empty, checked to be what this model produces for `batch` rows and `encoder_len` encoder tokens."""
    from transformers import DynamicCache, EncoderDecoderCache

    if not isinstance(cache, EncoderDecoderCache) or not all(
            isinstance(c, DynamicCache) for c in (cache.self_attention_cache, cache.cross_attention_cache)):
        raise TypeError(f"cache: {type(model).__name__} continues the EncoderDecoderCache (of two DynamicCaches) a "
                        f"previous call returned (out.past_key_values), got {_describe(cache)}")
    past = _layers(model, cache.self_attention_cache, "self-attention", batch, None)
    cross = _layers(model, cache.cross_attention_cache, "cross-attention", batch, encoder_len)
    updated = [bool(cache.is_updated.get(i, False)) for i in range(decoder_layers(model.config))]
    if cross is not None and not all(updated):
        # transformers would compute them again and append them to those held: not what a continued call means.
        raise ValueError("cache: its cross-attention keys are filled but is_updated is False for some layers; pass "
                         "the cache a previous call returned, or EncoderDecoderCache(DynamicCache(), DynamicCache())")
    return past, cross


def _layers(model: nn.Module, cache, what: str, batch: int, length: int | None) -> tuple[list, list] | None:
    """`cache`'s layers' (keys, values), None for a cache not filled yet; `length`: the one they must have."""
    from transformers.cache_utils import DynamicLayer

    layers = decoder_layers(model.config)
    if len(cache.layers) not in (0, layers):
        raise ValueError(f"cache: its {what} cache holds {len(cache.layers)} layers, {type(model).__name__}'s "
                         f"decoder has {layers}; pass the cache this model returned")
    if not any(layer.is_initialized for layer in cache.layers):
        return None
    expected = (batch, heads(model.config), head_dim(model.config))
    first = cache.layers[0].keys
    keys, values = [], []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise ValueError(f"cache: {what} layer {i} is a {type(layer).__name__}"
                             f"{'' if layer.is_initialized else ' (empty)'}; a compiled forward continues the "
                             "full DynamicCache layers it filled")
        for name, tensor in (("keys", layer.keys), ("values", layer.values)):
            got = (tensor.shape[0], tensor.shape[1], tensor.shape[3]) if tensor.dim() == 4 else tuple(tensor.shape)
            if got != expected or tensor.shape[2] != first.shape[2] or (length is not None and tensor.shape[2] != length):
                size = f"encoder length={length}" if length is not None else "past length"
                raise ValueError(f"cache: {what} layer {i} {name} have shape {tuple(tensor.shape)}; this call needs "
                                 f"[batch={batch}, heads={expected[1]}, {size}, head dim={expected[2]}]"
                                 f"{'' if length is not None else ' with one past length for every layer'}")
        keys.append(layer.keys)
        values.append(layer.values)
    return keys, values


def empty_layers(model: nn.Module, batch: int, length: int) -> tuple[list, list]:
    """Each decoder layer's keys and values for `batch` rows, `length` long (zeros), as the graphs take them."""
    weight = next(model.parameters())
    shape = (batch, heads(model.config), length, head_dim(model.config))
    layers = range(decoder_layers(model.config))
    return [weight.new_zeros(shape) for _ in layers], [weight.new_zeros(shape) for _ in layers]


def decoder_layers(config) -> int:
    return (getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None)
            or config.num_hidden_layers)


def _encoder_outputs(value) -> dict | None:
    """A call's encoder_outputs (a BaseModelOutput or tuple, as the original takes them) as its fields."""
    if value is None:
        return None
    if isinstance(value, dict):
        fields = dict(value)
    elif isinstance(value, (tuple, list)):
        fields = dict(zip(("last_hidden_state", "hidden_states", "attentions"), value))
    else:
        raise TypeError(f"encoder_outputs: expected a BaseModelOutput or a tuple (last_hidden_state, ...), got "
                        f"{type(value).__name__}")
    states = fields.get("last_hidden_state")
    if not isinstance(states, torch.Tensor) or states.dim() != 3:
        raise TypeError("encoder_outputs: its first field must be the encoder's last hidden state [batch, encoder "
                        "length, d_model] (out.encoder_last_hidden_state)")
    return fields


def _encoder_shape(inputs: dict) -> tuple[int, int]:
    for name in (ENCODER_STATES, "input_ids", "attention_mask"):
        if isinstance(inputs.get(name), torch.Tensor):
            return tuple(inputs[name].shape[:2])
    raise AssertionError("check_seq2seq_cached_call makes sure a call passes one")


def _describe(cache) -> str:
    inner = getattr(cache, "self_attention_cache", None)
    if inner is None:
        return type(cache).__name__
    return f"{type(cache).__name__}({type(inner).__name__}, {type(cache.cross_attention_cache).__name__})"


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

"""An encoder-decoder with its decoder's caches as buffers: the modules seq2seq generation graphs come from.

As `kv_cache.WithStaticCache` for causal LMs, the model's children are registered as the wrapper's
own, so parameters keep their names (`decoder.block.0.layer.1.EncDecAttention.q.weight`) and the
spec's passes mount the same adapters as on the training graph. Three calls, each captured once:

- `Seq2SeqEncoder`: the encoder's last hidden state (run once per generate()).
- `WithSeq2SeqCache` with `fill_cross=True`: the first decoder step; it computes every layer's
  cross-attention keys and values from the encoder output and writes them into the cross cache.
- `WithSeq2SeqCache` with `fill_cross=False`: every later step; it reads the cross cache as written
  (transformers' `EncoderDecoderCache.is_updated`, a Python flag, is set before capture, so each
  graph holds one branch) and appends one position to the self-attention cache.

The cross cache is a StaticCache exactly as long as the encoder's output, so its full keys are the
encoder's; graphs are therefore keyed by the encoder length as well as the batch and cache length.
"""

from __future__ import annotations

import inspect

from torch import nn

from peftc.runtime.kv_cache import CACHE_ROOT

CROSS_ROOT = "peftc_cross_cache"


class Seq2SeqEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)

    def forward(self, input_ids, attention_mask):
        return self._model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class WithSeq2SeqCache(nn.Module):
    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int, encoder_len: int,
                 fill_cross: bool, caches=None):
        super().__init__()
        from transformers import EncoderDecoderCache, StaticCache

        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)
        self.fill_cross = fill_cross
        if caches is None:  # the step graphs share one pair of caches: the fill graph writes what the next reads
            # The model's config, not get_text_config(decoder=True): on BART that is a default config (16 heads).
            config = model.config
            weight = next(model.parameters())
            caches = []
            for length in (max_cache_len, encoder_len):
                cache = StaticCache(config=config, max_cache_len=length)
                cache.early_initialization(batch_size, heads(config), head_dim(config), weight.dtype, weight.device)
                caches.append(cache)
        self.caches = caches
        for root, cache in zip((CACHE_ROOT, CROSS_ROOT), caches):
            buffers = nn.Module()
            for i, layer in enumerate(cache.layers):
                buffers.register_buffer(f"keys_{i}", layer.keys, persistent=False)
                buffers.register_buffer(f"values_{i}", layer.values, persistent=False)
                buffers.register_buffer(f"length_{i}", layer.cumulative_length, persistent=False)
            self.add_module(root, buffers)
        self.cache = EncoderDecoderCache(*caches)
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask, decoder_attention_mask,
                cache_position):
        from transformers.modeling_outputs import BaseModelOutput

        self_cache, cross_cache = self.caches
        # The fill levels come from the call (the model reads them from the cache: no cache_position
        # argument), so one captured graph serves every step.
        for layer in self_cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        for layer in cross_cache.layers:
            layer.cumulative_length.zero_()
        # Which branch of transformers' cross-attention this graph holds (see the module docstring).
        for i in range(len(cross_cache.layers)):
            self.cache.is_updated[i] = not self.fill_cross
        return self._model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                           attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                           decoder_attention_mask=decoder_attention_mask, use_cache=True, **{self.cache_keyword: self.cache}).logits


def heads(config) -> int:
    return (getattr(config, "decoder_attention_heads", None) or getattr(config, "num_key_value_heads", None)
            or config.num_attention_heads)


def head_dim(config) -> int:
    if getattr(config, "d_kv", None):
        return config.d_kv  # T5: its heads' width need not be d_model / heads
    return getattr(config, "head_dim", None) or config.d_model // heads(config)


class WithSeq2SeqTensorCache(nn.Module):
    """An encoder-decoder whose decoder caches enter and leave as tensors: what forward calls with a cache are
    captured from (peftc.runtime.seq2seq_forward_cache), as `tensor_cache.WithTensorCache` for causal LMs.

    Its forward fills an `EncoderDecoderCache` of two DynamicCaches from the tensors passed (self-attention:
    `past_keys`/`past_values`, none for a call without a past; cross-attention: `cross_keys`/`cross_values`,
    none where this call computes them from the encoder output), calls the model with it and returns the
    model's output without the cache and encoder output it was given, and each layer's keys and values after
    the call (the cross ones only where computed). A call without a past passes no cache: the model makes
    its own where it keeps one, and where it keeps none (BART given labels) none comes back, as from the
    original. `encoder_hidden_states`: the encoder output a call passes (its `encoder_outputs`), else the
    model runs its encoder on the call's input_ids."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)
        self.cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.cache_field = "cache"  # the output field holding the cache; read from the traced output

    def forward(self, past_keys=None, past_values=None, cross_keys=None, cross_values=None,
                encoder_hidden_states=None, **kwargs):
        from transformers import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        from peftc.runtime.tensor_cache import fill

        cache = None  # no past: the model makes its cache where it keeps one (BART keeps none with labels)
        if past_keys is not None or cross_keys is not None:
            self_cache, cross_cache = DynamicCache(), DynamicCache()
            if past_keys is not None:
                fill(self_cache, past_keys, past_values)
            if cross_keys is not None:
                fill(cross_cache, cross_keys, cross_values)
            cache = EncoderDecoderCache(self_cache, cross_cache)  # is_updated: whether cross keys were passed
        if encoder_hidden_states is not None:
            kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=encoder_hidden_states)
        out = self._model(**{self.cache_keyword: cache}, use_cache=True, **kwargs)
        cache = next((value for name, value in out.items() if isinstance(value, EncoderDecoderCache)), None)
        self.cache_field = next((name for name, value in out.items() if value is cache), self.cache_field)
        given = (cache, encoder_hidden_states)
        rest = type(out)(**{name: value for name, value in out.items() if not any(value is g for g in given)})
        result = {"output": rest}
        if cache is None:  # the original returns none for this call
            return result
        result.update({SELF_KEYS: tuple(layer.keys for layer in cache.self_attention_cache.layers),
                       SELF_VALUES: tuple(layer.values for layer in cache.self_attention_cache.layers)})
        if cross_keys is None:
            cross = cache.cross_attention_cache.layers
            result.update({CROSS_KEYS: tuple(layer.keys for layer in cross),
                           CROSS_VALUES: tuple(layer.values for layer in cross)})
        return result


SELF_KEYS, SELF_VALUES = "peftc_cache_keys", "peftc_cache_values"  # as cache_points.KEYS / VALUES
CROSS_KEYS, CROSS_VALUES = "peftc_cross_keys", "peftc_cross_values"

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

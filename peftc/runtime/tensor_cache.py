"""A causal LM whose KV cache enters and leaves as tensors: the module cached-forward graphs are captured from.

transformers' forward takes and returns a `DynamicCache` object, which torch.export cannot put
in a graph's inputs or outputs without registering the class as a pytree node process-wide
(transformers.integrations.executorch's `register_dynamic_cache_export_support`). This wrapper
keeps the object inside the trace instead: its forward takes each layer's past keys and values
as tensors, fills a `DynamicCache` with them, calls the model with it, and returns the model's
output without the cache plus each layer's keys and values after the call. The runtime
(peftc.runtime.forward_cache) wraps the tensors into a `DynamicCache` again, so callers see what
the original returns. As `WithStaticCache` does, it registers the model's children as its own, so
parameter names and sites are the model's and the spec's passes mount the same adapters.
Sliding-window layers are full layers here (`full_attention_cache`).
"""

from __future__ import annotations

from torch import nn

from peftc.capture.cache_points import KEYS, VALUES, cache_parameter


class WithTensorCache(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)  # called, not registered: its children are ours
        self.cache_parameter = cache_parameter(model)
        self.cache_field = "cache"  # the output field holding the cache; read from the traced output

    def forward(self, past_keys=None, past_values=None, cache_position=None, **kwargs):
        """`cache_position`: where the call's tokens sit in the cache, read by the prompt passes only (a model with
        virtual tokens: peftc.runtime.prompt_cache); the model counts its own from the cache, the same."""
        cache = full_attention_cache(self._model.config.get_text_config(decoder=True))
        if past_keys is not None:
            fill(cache, past_keys, past_values)
        out = self._model(**{self.cache_parameter: cache}, use_cache=True, **kwargs)
        self.cache_field = next(name for name, value in out.items() if value is cache)
        rest = type(out)(**{name: value for name, value in out.items() if value is not cache})
        # The layers that ran: all of them, but in layer_stacks' two-layer capture, which grows the tuples
        # back to every layer as it does transformers' per-layer outputs (peftc.capture.recorded_outputs).
        ran = [i for i, layer in enumerate(cache.layers) if past_keys is None or layer.keys is not past_keys[i]]
        return {"output": rest, KEYS: tuple(cache.layers[i].keys for i in ran),
                VALUES: tuple(cache.layers[i].values for i in ran)}


def full_attention_cache(config):
    """A DynamicCache for `config` whose sliding-window layers are full ones (DynamicLayer), as the generation
    graphs' StaticCache (peftc.runtime.kv_cache). transformers' DynamicSlidingWindowLayer keeps the last
    window - 1 positions and tracks its length in a Python int, which a captured graph would bake in (Mistral,
    Gemma 2/3 failed to capture); a full layer keeps every position and the model's sliding-window mask
    (create_sliding_window_causal_mask, from config.sliding_window) still limits what each query sees, so the
    logits are the original's. Such a layer holds more past than the original's: the positions before the window."""
    from transformers import DynamicCache

    return with_full_layers(DynamicCache(config=config))


def with_full_layers(cache):
    """`cache` (a DynamicCache not filled yet) with a full DynamicLayer for each sliding one, in place."""
    from transformers.cache_utils import DynamicLayer

    cache.layers = [DynamicLayer() if getattr(layer, "is_sliding", False) and not layer.is_initialized else layer
                    for layer in cache.layers]
    return cache


def fill(cache, keys, values):
    """`cache` holding `keys` and `values` (one tensor each per layer) as its layers' state, not copied:
    what DynamicLayer.update leaves, without the concatenation onto an empty tensor it would do first."""
    from transformers.cache_utils import DynamicLayer

    while len(cache.layers) < len(keys):  # a DynamicCache() made without a config
        cache.layers.append(DynamicLayer())
    for layer, k, v in zip(cache.layers, keys, values):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache

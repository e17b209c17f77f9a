"""A causal LM with a transformers StaticCache as buffers: the module generation graphs are captured from.

As in transformers' ExecuTorch integration (`TorchExportableModuleWithStaticCache`), the cache
is allocated up front (batch size x max length) and its tensors registered as buffers, so
torch.export sees in-place buffer updates instead of a Cache object in the inputs and outputs.
Unlike that wrapper, this one registers the model's *children* as its own, so every parameter
keeps its fully qualified name (`model.layers.0.self_attn.q_proj.weight`) and the spec's
passes find the same sites and mount the same adapter parameters as on the training graph.

Sliding-window layers (Mistral, Gemma 2/3's local layers, Qwen2 with use_sliding_window) get a full
`StaticLayer` of the same length as the others. transformers' `StaticSlidingWindowLayer` keeps its
fill level in a Python int (`cumulative_length_int`) and branches on it, so a graph captured once
would bake in one step's branch (and the prefill capture leaks its symbolic length into the decode
capture). A full layer holds every position; the window is still applied by the model's own
sliding-window mask (`create_sliding_window_causal_mask` reads `config.sliding_window`), so the
attention is the same as with a rolling buffer, at the cost of memory for the positions before the
window.
"""

from __future__ import annotations

import inspect

from torch import nn

CACHE_ROOT = "peftc_kv_cache"


class WithStaticCache(nn.Module):
    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int):
        super().__init__()
        from transformers import StaticCache

        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_model", model)  # called, not registered: its children are ours
        config = model.config.get_text_config()
        self.cache = StaticCache(config=config, max_cache_len=max_cache_len)
        self.cache.layers = [full_length(layer, max_cache_len) for layer in self.cache.layers]
        weight = next(model.parameters())
        self.cache.early_initialization(batch_size, kv_heads(config), head_dim(config), weight.dtype,
                                        weight.device)
        buffers = nn.Module()
        for i, layer in enumerate(self.cache.layers):
            buffers.register_buffer(f"keys_{i}", layer.keys, persistent=False)
            buffers.register_buffer(f"values_{i}", layer.values, persistent=False)
            buffers.register_buffer(f"length_{i}", layer.cumulative_length, persistent=False)
        self.add_module(CACHE_ROOT, buffers)
        # Generation reads the last position's logits only: the LM head on the others (a whole prompt in
        # the prefill graph) is wasted work, which transformers' generate skips the same way.
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.head_kwargs = {"logits_to_keep": 1} if takes else {}

    def forward(self, input_ids, attention_mask, position_ids, cache_position):
        # The cache's fill level comes from the call, so one captured graph serves every step.
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(cache_position[0])
        return self._model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           cache=self.cache, cache_position=cache_position, use_cache=True,
                           **self.head_kwargs).logits


def full_length(layer, max_cache_len: int):
    """`layer`, or a full StaticLayer of `max_cache_len` for a sliding one (its window comes from the mask)."""
    from transformers.cache_utils import StaticLayer

    if getattr(layer, "is_sliding", False) and isinstance(layer, StaticLayer):
        return StaticLayer(max_cache_len=max_cache_len)
    return layer


def kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

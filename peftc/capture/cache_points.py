"""Where a causal LM writes its KV cache, marked in the superset capture so a cached graph can be derived.

transformers' attention layers hand each layer's keys and values to the cache object they are given,
`key_states, value_states = cache.update(key_states, value_states, self.layer_idx)`, after rotary and
before grouped-query attention repeats them, and attend over what it returns (the past and the new
tokens, concatenated on the sequence dim, for a DynamicCache). The superset capture
(peftc.compiler.first_build) passes a `PointCache` there: an empty DynamicCache whose `update`
returns the new keys and values through an identity op, `peftc::cache_point(x, role)`, and stores
nothing, so the model computes what it computes without a cache and export records where the update
was. Right after export `tag_cache_points` removes the ops again and leaves a tag on the node each
one read (`node.meta[CACHE_POINT]` = "keys" or "values"); no graph runs them, and the plain graphs are
the ones a capture without the cache object gives. The cached-forward derivation
(peftc.capture.cached_call) reads the tags: each one is where `cat(past, new)` goes.

No layer index is recorded (layer_stacks' copy of layer 1 as layers 2.. would see the two layers'
graphs differ): the k-th tagged keys in graph order are layer k's, as transformers updates layers in order.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.capture.binding import forward_signature, stand_in_for

CACHE_POINT = "peftc_cache_point"  # node.meta: "keys" / "values" where the model's cache update read them
ROLES = ("keys", "values")
KEYS, VALUES = "peftc_cache_keys", "peftc_cache_values"  # a cached-forward graph's output fields, one tensor per layer
CACHE_PARAMETERS = ("cache", "past_key_values")  # transformers 5.x's name, then the older one


def cache_argument(kwargs: dict):
    """The cache a call passes (under either keyword), or None."""
    return next((kwargs[k] for k in CACHE_PARAMETERS if kwargs.get(k) is not None), None)


@torch.library.custom_op("peftc::cache_point", mutates_args=())
def cache_point(x: torch.Tensor, role: str) -> torch.Tensor:
    """Identity (a copy: a custom op may not return its input); only traced, never run by a graph."""
    return x.clone()


@cache_point.register_fake
def _(x, role):
    return torch.empty_like(x)


cache_point.register_autograd(lambda ctx, grad: (grad, None))


def cache_parameter(model: nn.Module) -> str | None:
    """The name under which `model.forward` takes a KV cache, if it takes one."""
    params = forward_signature(model).parameters
    return next((name for name in CACHE_PARAMETERS if name in params), None)


@functools.cache
def _point_cache_class() -> type:
    from transformers import DynamicCache

    class PointCache(DynamicCache):
        """An empty DynamicCache that marks the keys and values the model updates it with, and keeps none.
        It sizes the mask as transformers sizes it without a cache (the keys as long as the padding mask),
        so the mask code traced is the one a call without a cache traces, with its input guards."""

        def __init__(self, config, padding_mask: torch.Tensor):
            super().__init__(config=config)
            self.padding_mask = padding_mask

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return cache_point(key_states, ROLES[0]), cache_point(value_states, ROLES[1])

        def get_mask_sizes(self, query_length, layer_idx=0):
            return self.padding_mask.shape[-1], 0

    return PointCache


class WithCachePoints(nn.Module):
    """`model`, called with a PointCache as its cache and without it in the output: what the superset
    capture traces. Its children, parameters and forward signature are the model's (stand_in_for), so
    the graph is the model's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        stand_in_for(self, model, forward_signature(model))
        self.cache_parameter = cache_parameter(model)

    @property
    def config(self):  # what model_kept restores after the capture
        return self._model.config

    def forward(self, *args, **kwargs):
        config = self._model.config.get_text_config(decoder=True)
        cache = _point_cache_class()(config, kwargs["attention_mask"])
        out = self._model(*args, **kwargs, **{self.cache_parameter: cache})
        if not hasattr(out, "items"):  # return_dict=False: a tuple, the cache in it wherever the model put it
            return type(out)(value for value in out if value is not cache)
        return type(out)(**{name: value for name, value in out.items() if value is not cache})


def marks_cache(model: nn.Module, kwargs: dict) -> bool:
    """Whether the superset capture of this call traces WithCachePoints: a transformers decoder-only model
    that generates (an encoder-decoder's cache holds cross-attention too), whose forward takes a cache the
    call does not pass, called with a 2-D padding mask (PointCache sizes the mask by it)."""
    name, config = cache_parameter(model), getattr(model, "config", None)
    mask = kwargs.get("attention_mask")
    return (name is not None and config is not None and not getattr(config, "is_encoder_decoder", False)
            and _generates(model) and isinstance(mask, torch.Tensor) and mask.dim() == 2
            and not any(kwargs.get(k) is not None for k in CACHE_PARAMETERS) and _takes_keyword(model, name))


def _generates(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    return callable(can) and bool(can())


def _takes_keyword(model: nn.Module, name: str) -> bool:
    return forward_signature(model).parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                              inspect.Parameter.KEYWORD_ONLY)


def tag_cache_points(gm: GraphModule) -> GraphModule:
    """Replace each `peftc::cache_point(x, role)` by `x`, tagging `x` with its role. A point whose `x` has
    other uses (the model read its keys before the update too) tags nothing: a cached graph is not derived."""
    points = list(gm.graph.find_nodes(op="call_function", target=torch.ops.peftc.cache_point.default))
    if not points:
        return gm
    clean = all(len(point.args[0].users) == 1 for point in points)
    for point in points:
        source, role = point.args
        if clean:
            source.meta[CACHE_POINT] = role
        point.replace_all_uses_with(source)
        gm.graph.erase_node(point)
    gm.recompile()
    return gm

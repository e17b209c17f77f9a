"""Forward calls with a KV cache: `use_cache=True` returns a transformers DynamicCache, `cache=` continues it.

    out = cm(ids, attention_mask=mask, use_cache=True)            # out.past_key_values: a DynamicCache
    out = cm(next_ids, attention_mask=longer_mask, past_key_values=out.past_key_values, use_cache=True)

A graph takes every layer's past keys and values as tensors and returns them after the call; this
module checks the cache a call passes, hands its tensors to the graph (empty ones for a call without a
cache: one graph serves the prompt and every continued step) and stores what comes back in a
DynamicCache, the one passed (updated in place, as the original updates it) or a new one. One graph
per set of other inputs (with or without position_ids, labels, inputs_embeds in place of input_ids,
...), made on the first call that passes them; the past length, batch and sequence length are dynamic.

Where the graphs come from. A compiled model derives them from its superset capture, without export
(peftc.runtime.cache_derivation, peftc.capture.cached_call): that capture marked where the model
writes its cache (peftc.capture.cache_points), and the derived graph concatenates each layer's past
there and takes the attention mask and positions as inputs, which this module makes per call as the
original makes them (transformers' create_causal_mask over the past and new tokens; past + arange
positions). A check on the model's own outputs runs once per compiled model before the first derived
graph. Where there is no superset graph (a merged model, a compile given dynamic_shapes or
positional example inputs), the superset takes no position_ids (prompt and prefix tuning move
positions), a served model has prompt or prefix rows (GraphDispatch._serves_virtual_tokens), the model has chunked, bidirectional or softcapped attention (cached_call.layer_kinds;
sliding-window layers derive, each with its own mask), the graph cannot be derived (a call
outside the superset: logits_to_keep) or the check fails, the graph is captured from `WithTensorCache`
(peftc.runtime.tensor_cache) through the compiled model's own pipeline: the same passes, the same
adapter parameters. Where a captured graph's guards refuse a call with no past or with one new token
that the original accepts (OPT: sizes export cannot relate, `_run_specialized`), a graph captured for
calls of that kind runs it (one more capture each, on first use). A served model's graphs (peftc.serving.served), derived or
captured, take its routing `adapter_ids` as one more input (the check call passes two served adapters' ids). The capture traces two decoder layers and copies the rest
(peftc.capture.layer_stacks: each copy reads its own past tensors, `past_keys_<i>`), as the compile's
own capture does.

Which calls return a cache. As in the original (transformers 5.24: merge_with_config_defaults on the base
model's forward), `use_cache` is the argument when passed, else `config.use_cache` (the generation config
plays no part in forward), and it is dropped in training under gradient checkpointing while gradients are
on (use_cache=True included; the output then holds no cache). A cache passed is continued and returned
whatever `use_cache` says (LLaMA's rule; GPT-2 returns none for use_cache=False with a cache passed: not
followed). `return_dict=False` gives the original's tuple, the cache after the logits (and the loss).

- A call that asks (`use_cache=True`) or passes a cache runs the graphs here: derived, else captured.
- A call that says nothing, with config.use_cache on, runs the graph derived here and returns a new
  DynamicCache, in eval and in training alike, as the original does: `out = cm(ids)` then
  `cm(next_ids, past_key_values=out.past_key_values)` works. That graph is the flat one, run in place of the
  layer modules (forward hooks on `model.layers.<i>` do not fire; pass use_cache=False). Measured (benchmarks/RESULTS.md, "Plain calls
  return the cache"): the eval forward and the training step cost what the plain graphs cost, within the
  noise of a shared machine, and the training step's peak memory is the same to the byte (the cache holds
  the keys and values the attention saves for backward anyway).
- It keeps its plain graph and returns no cache where the derived graph is not to be had or would lose
  what the plain graph carries: no superset graph to derive from (compiles given
  dynamic_shapes or positional example inputs), prompt or prefix tuning (compiled or served rows), chunked, bidirectional
  or softcapped attention (Llama 4, Gemma 2), attention neither SDPA nor transformers' eager one
  (peftc.capture.attention_sites; GPT-2's reorder_and_upcast_attn), heads the gate refuses (sequence classifiers: the gate compares per-token logits; Falcon), inputs a cached graph does not take, a padding mask not
  as long as the tokens; the Inductor back end (its compiled layers run the plain graph; the derived graph
  is the flat one) and FSDP2-sharded models (the flat graph runs outside the per-layer hooks). Those
  calls return what `use_cache=False` returns; `use_cache=True` gets the cache there (one capture).

Encoder-decoders (T5, BART: an EncoderDecoderCache, the cross-attention's too) are peftc.runtime.seq2seq_forward_cache's.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import replace

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from peftc.capture.cache_points import CACHE_PARAMETERS, KEYS, VALUES, cache_argument
from peftc.capture.calls import CallSignature, is_hf_model
from peftc.capture.kept_logits import LOGITS_TO_KEEP, keep_positions, output_embeddings_path, positions_to_keep
from peftc.errors import ShardedError
from peftc.ir.modes import set_mode
from peftc.runtime.cache_derivation import CacheDerivation, derived_inputs, empty_past
from peftc.runtime.call_errors import GUARD
from peftc.runtime.kv_cache import head_dim, kv_heads
from peftc.runtime.prompt_cache import CACHE_POSITION
from peftc.runtime.tensor_cache import WithTensorCache, fill, full_attention_cache, with_full_layers

# Inputs a cached call may pass besides the cache, by what their dims are: [batch, new tokens] ...
TOKEN_INPUTS = ("input_ids", "position_ids", "labels")
TOTAL_INPUTS = ("attention_mask",)  # ... or [batch, past + new tokens]
EMBEDS_INPUTS = ("inputs_embeds",)  # ... or [batch, new tokens, hidden], in the token embedding's dtype
MAIN_INPUTS = ("input_ids", "inputs_embeds")  # the new tokens: exactly one of them, as the original requires
# Example sizes for the capture; all different, so that export's duck sizing ties no two dims.
BATCH, NEW, PAST = 2, 3, 5
PAST_LENGTH = Dim("past_length", min=0)


def wants_cache(model: nn.Module, kwargs: dict) -> bool:
    """Whether a (bound) call asks a model that takes a KV cache for one: `use_cache=True`, or a cache passed."""
    asks = kwargs.get("use_cache") is True or cache_argument(kwargs) is not None
    return asks and is_hf_model(model) and takes_cache(type(model))


def drops_cache(kwargs: dict, training: bool, checkpointing: bool) -> bool:
    """Whether the original ignores a call's use_cache=True: under gradient checkpointing, in training
    with gradients on and no cache passed (transformers' merge_with_config_defaults turns it off)."""
    return training and checkpointing and torch.is_grad_enabled() and cache_argument(kwargs) is None


def caches_by_default(model: nn.Module, kwargs: dict) -> bool:
    """Whether a (bound) call that neither asks for a cache nor refuses one gets one from the original:
    its `config.use_cache` (transformers' merge_with_config_defaults; the generation config plays no part)."""
    if kwargs.get("use_cache") is not None or cache_argument(kwargs) is not None:
        return False
    if not (is_hf_model(model) and takes_cache(type(model))):
        return False
    return bool(getattr(_text_config(model), "use_cache", False))


@functools.cache
def takes_cache(model_class: type) -> bool:
    """Whether the class's forward takes a cache (a causal LM's does; an encoder's use_cache, if any, is inert)."""
    return any(name in inspect.signature(model_class.forward).parameters for name in CACHE_PARAMETERS)


class CachedForward:
    """The cached-forward graphs of one compiled model (its compilation, under its plan), by call signature.

    `superset`: the compile's superset call and its flat graph, which graphs are derived from
    (peftc.runtime.cache_derivation) where the model allows; None: every signature captures. `gate_inputs`: the
    graphs' inputs besides the model's for the derivation's 2-row check call (a served model's adapter_ids)."""

    def __init__(self, compilation, plan, superset: tuple[tuple[tuple, dict], GraphModule] | None = None,
                 runtime_inputs: tuple[str, ...] = (), gate_inputs: dict | None = None):
        self.compilation = compilation
        self.runtime_inputs = runtime_inputs  # what the caller's wrapper adds (refuse_uncapturable lets them pass)
        # As generation does: the flat graph, no layer calls or checkpointing (nothing to recompute).
        self.plan = replace(plan, structure_layers=False, checkpoint_layers=False)
        self.source = WithTensorCache(compilation.source)
        self.graphs: dict[CallSignature, GraphModule] = {}
        self.modes: dict[GraphModule, bool] = {}  # the mode each graph's nodes are in
        self.unkept: set[CallSignature] = set()  # logits_to_keep positions no graph here can take: captured
        self.cache_fields: dict[GraphModule, str] = {}  # a derived graph's output field for the cache
        self.underived: set[CallSignature] = set()  # signatures no graph derives for (tried once)
        # Graphs for calls with no past or one new token where the shared graph's guards refuse them, by
        # (signature, with a past, one token): _run_specialized.
        self.specialized: dict[tuple[CallSignature, bool, bool], GraphModule] = {}
        # The superset's flat graph ran the same passes unless its plan checkpointed inline (no layer structure).
        same_passes = plan.structure_layers or not plan.checkpoint_layers
        self.derivation = CacheDerivation(compilation.source, *superset, gate_inputs=gate_inputs) \
            if superset is not None and same_passes else None

    @property
    def model(self) -> nn.Module:
        return self.compilation.source

    def __call__(self, kwargs: dict, training: bool, graph_inputs: dict | None = None, capture: bool = True):
        """`graph_inputs`: more keywords the graphs take, which the model does not (a served model's adapter_ids);
        `capture=False`: None instead of capturing a graph this call's signature has none of (no graph derives)."""
        cache = cache_argument(kwargs)
        inputs = {k: v for k, v in kwargs.items() if k not in CACHE_PARAMETERS and k != "use_cache"}
        batch, new = _main_input(inputs).shape[:2]
        past = past_tensors(self.model, cache, batch) if cache is not None else None
        keys, values = past if past is not None else empty_past(self.model, batch)
        inputs = _with_full_mask(inputs, keys[0].shape[2], new)
        found = self.graph_for(inputs, capture)
        if found is None:
            return None
        gm, inputs = found
        if self.modes.get(gm) is not training:  # set_mode walks the graph: only when the mode changed
            set_mode(gm, training)
            self.modes[gm] = training
        # A cache passed empty, as DynamicCache(config=...) makes it: full layers where the model slides (_new_cache).
        cache = with_full_layers(cache) if cache is not None and past is None else cache
        cache = cache if cache is not None else _new_cache(self.model)
        derived = derived_inputs(self.model, inputs, cache, keys[0].shape[2]) if gm in self.cache_fields else {}
        if self.specialized and not derived and self._kind(inputs, past) in self.specialized:  # refused before
            result = self._run_specialized(inputs, past, training, graph_inputs)
        else:
            try:
                result = gm(past_keys=list(keys), past_values=list(values), **{**inputs, **derived},
                            **(graph_inputs or {}))
            except AssertionError as err:
                if derived or not (past is None or new == 1) or not GUARD.search(str(err)):
                    raise
                result = self._run_specialized(inputs, past, training, graph_inputs)
        out, keys, values = result["output"], result[KEYS], result[VALUES]
        cache = fill(cache, keys, values)
        field = self.cache_fields.get(gm, self.source.cache_field)
        return type(out)(**{**out, field: cache})  # in the original's field order

    def _run_specialized(self, inputs: dict, past: tuple | None, training: bool, graph_inputs: dict | None) -> dict:
        """A call the shared graph's guards refused, run by a graph captured for calls of its kind: with no past,
        or with one new token. The shared graph was captured with 5 past and 3 new tokens, and a model may read
        sizes export cannot relate: OPT slices its mask-derived positions at `[:, past_length:]`, whose length
        (mask length - past) export neither knows is the tokens' nor shorter than the mask, so it guards
        `mask length != mask length - past` (no past breaks it) and `mask length - past != 1` (one token does)."""
        kind = self._kind(inputs, past)
        if kind not in self.specialized:
            example, shapes = self._example(inputs, with_past=kind[1], one_token=kind[2])
            self.specialized[kind] = replace(self.compilation, source=self.source).build(
                (), example, self.plan, dynamic_shapes=shapes).graph_module
        gm = self.specialized[kind]
        if self.modes.get(gm) is not training:
            set_mode(gm, training)
            self.modes[gm] = training
        pasts = {"past_keys": list(past[0]), "past_values": list(past[1])} if past is not None else {}
        return gm(**pasts, **inputs, **(graph_inputs or {}))

    @staticmethod
    def _kind(inputs: dict, past: tuple | None) -> tuple[CallSignature, bool, bool]:
        """What a specialized graph is kept by: the call's signature, whether it has a past, one new token."""
        return CallSignature.of((), inputs), past is not None, _main_input(inputs).shape[1] == 1

    def graph_for(self, inputs: dict, capture: bool = True) -> tuple[GraphModule, dict] | None:
        """The graph for this call and the call as it takes it: an int logits_to_keep as its positions, the
        graph of the call without it keeping them (peftc.capture.kept_logits). None where `capture` is False
        and the graph would have to be captured."""
        kept = positions_to_keep(self.model, inputs)
        signature = CallSignature.of((), kept)
        if kept is inputs or signature in self.unkept:
            return _paired(self._graph(inputs, capture), inputs)
        if signature not in self.graphs:
            rest = self._graph({name: value for name, value in inputs.items() if name != LOGITS_TO_KEEP}, capture)
            if rest is None:
                return None
            head = output_embeddings_path(self.model)
            graph = keep_positions(rest, head) if head is not None else None
            if graph is None:  # the LM head reads something else: the int stays in the signature
                self.unkept.add(signature)
                return _paired(self._graph(inputs, capture), inputs)
            if rest in self.cache_fields:  # kept from a derived graph: it takes the mask and positions too
                self.cache_fields[graph] = self.cache_fields[rest]
            self.graphs[signature] = graph
        return self.graphs[signature], kept

    def _graph(self, inputs: dict, capture: bool = True) -> GraphModule | None:
        """The graph of this signature: derived from the superset graph where it can be, else captured (or
        None, without `capture`)."""
        signature = CallSignature.of((), inputs)
        if signature not in self.graphs:
            derived = None
            if self.derivation is not None and signature not in self.underived:
                derived = self.derivation.derive(inputs)
            if derived is None:
                self.underived.add(signature)  # derivation is tried once per signature
                if not capture:
                    return None
                refuse_uncapturable(inputs, self.runtime_inputs)
            if derived is not None:
                self.cache_fields[derived.graph_module] = derived.cache_field
            self.graphs[signature] = derived.graph_module if derived is not None else self._capture(inputs)
        return self.graphs[signature]

    def _capture(self, inputs: dict) -> GraphModule:
        example, shapes = self._example(inputs)
        built = replace(self.compilation, source=self.source).build((), example, self.plan, dynamic_shapes=shapes)
        return built.graph_module

    def _example(self, inputs: dict, with_past: bool = True, one_token: bool = False) -> tuple[dict, dict]:
        """A call like `inputs` at the example sizes, and its dynamic shapes; `with_past=False`: a call with no
        past (no past_keys, the mask as long as the tokens); `one_token`: one new token, a static size."""
        example, shapes = {}, {}
        past_length = PAST if with_past else 0
        new = 1 if one_token else NEW
        new_dim, total_dim = _token_dims(with_past, one_token)
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                example[name], shapes[name] = value, None  # a flag (or logits_to_keep, where not derived)
                continue
            width = new if name in TOKEN_INPUTS + EMBEDS_INPUTS else past_length + new
            if name in EMBEDS_INPUTS:
                weight = self.model.get_input_embeddings().weight
                example[name] = weight.new_zeros(BATCH, width, value.shape[-1]).normal_()
                shapes[name] = {0: Dim.AUTO, 1: new_dim, 2: Dim.STATIC}  # hidden is the model's: static
                continue
            if name == CACHE_POSITION:  # [new tokens]: a prompt model's (peftc.runtime.prompt_cache)
                example[name], shapes[name] = torch.arange(past_length, past_length + new, device=value.device), {0: new_dim}
                continue
            if name == "position_ids":
                example[name] = torch.arange(past_length, past_length + new, device=value.device).expand(BATCH, -1).to(value.dtype)
            else:
                example[name] = value.new_ones(BATCH, width) if name in TOTAL_INPUTS else value.new_zeros(BATCH, width)
            shapes[name] = {0: Dim.AUTO, 1: total_dim if name in TOTAL_INPUTS else new_dim}
        if not with_past:
            return example, shapes
        keys, values = empty_past(self.model, BATCH, PAST)
        example.update(past_keys=[k.normal_() for k in keys], past_values=[v.normal_() for v in values])
        # One past length for every layer: one symbol, so each layer reads the same size (layer_stacks can copy them).
        past = {0: Dim.AUTO, 2: PAST_LENGTH}
        shapes.update(past_keys=[past] * len(keys), past_values=[past] * len(keys))
        return example, shapes


def _token_dims(with_past: bool, one_token: bool) -> tuple:
    """The dynamic shapes of a call's new-token dim and of its mask's (past + new) dim."""
    if not one_token:
        return Dim.AUTO, Dim.AUTO
    # One token: static; a mask after a past is past + 1, a relation export asks to be told (it cannot be
    # stated for past + a dynamic new, hence the shared graph's guards).
    return Dim.STATIC, PAST_LENGTH + 1 if with_past else Dim.STATIC


def refuse_sharded(sharded: bool) -> None:
    """A sharded model cannot run a cached forward (checked once, before the first capture)."""
    if sharded:
        raise ShardedError("a forward with a KV cache (use_cache=True or cache=) on a model FSDP2 (fully_shard) "
                           "sharded: its graph runs outside FSDP2's hooks. Call it with use_cache=False, or save "
                           "the adapter (cm.save_adapter) and decode on one process from peftc.compile(base, spec)")


def refuse_uncapturable(inputs: dict, runtime_inputs: tuple[str, ...] = ()) -> None:
    """Refuse, before a capture, a cached call passing tensors a captured cached graph cannot take (a graph
    derived from the superset takes every input of the superset: num_items_in_batch, ...), naming them.
    `runtime_inputs`: inputs the runtime itself adds to the caller's (prompt tuning's cache_position)."""
    supported = set(TOKEN_INPUTS + TOTAL_INPUTS + EMBEDS_INPUTS + CACHE_PARAMETERS) | {"use_cache"}
    tensors = sorted(k for k, v in inputs.items()
                     if isinstance(v, torch.Tensor) and k not in supported and k not in runtime_inputs)
    if tensors:
        raise NotImplementedError(f"a forward with a KV cache takes {sorted(supported)} (and flags); this call "
                                  f"also passes {tensors}. Pass use_cache=False, or call "
                                  "cm.merge_and_unload() for the original model with every option")


def check_cached_call(model: nn.Module, kwargs: dict) -> None:
    """Refuse a call a cached forward cannot run, naming what it passes (before anything is derived)."""
    main = [k for k in MAIN_INPUTS if kwargs.get(k) is not None]
    if len(main) != 1:  # the original's rule, checked here: the capture would fail less clearly
        raise ValueError(f"a forward with a KV cache needs exactly one of input_ids [batch, new tokens] or "
                         f"inputs_embeds [batch, new tokens, hidden]; this call passes {main or 'neither'}")
    tensor = kwargs[main[0]]
    dims = 2 if main[0] == "input_ids" else 3
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
        raise TypeError(f"a forward with a KV cache needs {main[0]} with {dims} dims "
                        f"({'[batch, new tokens]' if dims == 2 else '[batch, new tokens, hidden]'})")
    if dims == 3:
        weight = model.get_input_embeddings().weight
        if tensor.shape[-1] != weight.shape[-1] or tensor.dtype != weight.dtype:
            raise ValueError(f"inputs_embeds: [..., {tensor.shape[-1]}] {tensor.dtype}; {type(model).__name__}'s "
                             f"token embeddings are [..., {weight.shape[-1]}] {weight.dtype}, as inputs_embeds "
                             "must be (model.get_input_embeddings()(input_ids) gives them)")


def covers_new_tokens(kwargs: dict) -> bool:
    """Whether a call without a cache passes no padding mask, or one as long as its new tokens."""
    mask = kwargs.get("attention_mask")
    return not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[1] == _main_input(kwargs).shape[1]


def past_tensors(model: nn.Module, cache, batch: int) -> tuple[list, list] | None:
    """Each layer's (keys, values) in `cache`, checked to be what this model produces for `batch` rows;
    None for a cache not filled yet (`DynamicCache(config=...)`, passed for the first call)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise TypeError(f"cache: expected the transformers DynamicCache a previous call returned "
                        f"(out.past_key_values), got {type(cache).__name__}")
    config = _text_config(model)
    layers = config.num_hidden_layers
    if len(cache.layers) not in (0, layers):  # DynamicCache() makes its layers on first update
        raise ValueError(f"cache: holds {len(cache.layers)} layers, {type(model).__name__} has {layers}; "
                         "pass the cache this model returned")
    if not any(layer.is_initialized for layer in cache.layers):
        return None
    expected = (batch, kv_heads(config), head_dim(config))
    keys, values = [], []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise ValueError(f"cache: layer {i} is a {type(layer).__name__}{'' if layer.is_initialized else ' (empty)'}; "
                             "a compiled forward continues full-attention DynamicCache layers it filled")
        for what, tensor in (("keys", layer.keys), ("values", layer.values)):
            got = (tensor.shape[0], tensor.shape[1], tensor.shape[3]) if tensor.dim() == 4 else tuple(tensor.shape)
            if got != expected or tensor.shape[2] != cache.layers[0].keys.shape[2]:
                raise ValueError(f"cache: layer {i} {what} have shape {tuple(tensor.shape)}; this call needs "
                                 f"[batch={batch}, kv heads={expected[1]}, past length, head dim={expected[2]}] "
                                 "with one past length for every layer")
        keys.append(layer.keys)
        values.append(layer.values)
    return keys, values


def _new_cache(model: nn.Module):
    return full_attention_cache(_text_config(model))


def _text_config(model: nn.Module):
    return model.config.get_text_config(decoder=True)


def _paired(gm: GraphModule | None, inputs: dict) -> tuple[GraphModule, dict] | None:
    return (gm, inputs) if gm is not None else None


def _main_input(inputs: dict) -> torch.Tensor:
    """The new tokens' input: [batch, new, ...] (check_cached_call made sure there is exactly one)."""
    return next(inputs[k] for k in MAIN_INPUTS if inputs.get(k) is not None)


def _with_full_mask(inputs: dict, past: int, new: int) -> dict:
    """A mask over past and new tokens: bind_call's stand-in for a missing mask covers the new ones only."""
    mask = inputs.get("attention_mask")
    if past and mask is not None and mask.shape[1] == new and bool(mask.all()):
        inputs = {**inputs, "attention_mask": torch.cat([mask.new_ones(mask.shape[0], past), mask], 1)}
    return inputs

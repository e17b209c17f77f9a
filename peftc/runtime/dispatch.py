"""GraphDispatch: an nn.Module that runs the graph built for each call's signature.

torch.export specializes a graph on which arguments a call passes (labels or not, a mask or
not). A dispatch keeps one graph per call signature: the first, built when it was made, and
others built on first use of a new signature by the same Compilation and plan (or derived
without a capture from the superset graph: peftc.capture.specialize); a call with
`use_cache=True` or a KV cache passed runs peftc.runtime.forward_cache's graphs, and so does a call
saying nothing of a cache where the original returns one (config.use_cache) and that graph derives
without a capture (forward_cache's docstring: which calls return a cache); an encoder-decoder's run
peftc.runtime.seq2seq_forward_cache's (captured on first use: plain calls keep their graph). The dispatch
owns the module tree every graph reads (peftc.runtime.module_tree): base weights at their
original paths, layers as modules, adapters under `peftc`; the graphs themselves are not
submodules.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.capture.binding import bind_call
from peftc.capture.calls import CallSignature, normalize_call
from peftc.capture.embeds_input import derive_embeds_graph
from peftc.capture.input_defaults import rows_broadcast
from peftc.capture.kept_logits import derive_kept_logits_graph, positions_to_keep
from peftc.capture.sharded import is_sharded, runnable
from peftc.capture.specialize import derive_graph
from peftc.capture.superset import ExtraInputs
from peftc.compiler.first_build import FirstBuild, build_first
from peftc.errors import ShardedError
from peftc.ir.modes import set_mode
from peftc.pipeline.state import MergeState
from peftc.runtime.call_contract import apply_output_flags, split_output_flags
from peftc.runtime.call_errors import raise_call_error
from peftc.runtime.facade import ModelAttributes
from peftc.runtime.forward_cache import (CachedForward, caches_by_default, check_cached_call, covers_new_tokens,
                                         drops_cache, refuse_sharded, wants_cache)
from peftc.runtime.generate import Generator, generate
from peftc.runtime.module_tree import adopt_tree, attach_graph
from peftc.runtime.prefix_window import call_length, check_prefix_window, limits_call_length, prefix_tokens
from peftc.runtime.prompt_cache import CACHE_POSITION, prepended_tokens, with_cache_slots
from peftc.runtime.seq2seq_forward_cache import Seq2SeqCachedForward, is_encoder_decoder
from peftc.runtime.seq2seq_generate import Seq2SeqGenerator, generate_seq2seq


class GraphDispatch(ModelAttributes, nn.Module):
    """Runs `compilation.build(args, kwargs, plan)`'s graph for each call signature."""

    def __init__(self, compilation, plan, first, example: tuple[tuple, dict], training: bool = False,
                 superset: tuple[tuple[tuple, dict], GraphModule, GraphModule] | None = None):
        super().__init__()
        self.training = training
        self.compilation = compilation  # a dataclass, not a module: the user's model is not our submodule
        self.plan = plan
        self._example = example  # the first graph's call: other plans build their first graph from it
        self._checks_call_length = limits_call_length(compilation.source, compilation.spec)  # prefix + chunks
        self._use_first(first, superset)
        self.sign_forward()

    def _use_first(self, first, superset=None) -> None:
        """Run `first` (a Built) for the example's signature and own its module tree."""
        self.records = first.records
        self.sites = list(first.sites)
        self._first_signature = CallSignature.of(*self._example)
        self._graphs = {self._first_signature: first.graph_module}  # not submodules: the tree is ours
        self._flat = {self._first_signature: first.flat}  # a dict: graph modules are not our submodules
        self._tree_origin = adopt_tree(self, first.graph_module)
        self._generator = None  # built on the first generate()
        self._cached_forward = None  # built on the first call with a KV cache
        set_mode(first.graph_module, self.training)
        self._keep_superset(superset)

    def _keep_superset(self, superset) -> None:
        """The graph captured for the superset call (peftc.compiler.first_build): others derive from it,
        cached-forward graphs from its flat form (the passes' graph, layers inline)."""
        self._superset = superset[0] if superset is not None else None
        self._superset_flat = superset[2] if superset is not None else None
        self._unmet = set()  # signatures of graphs held but not called yet: the superset's
        if superset is not None:
            signature, gm = CallSignature.of(*superset[0]), superset[1]
            attach_graph(self, gm, self._tree_origin)
            set_mode(gm, self.training)
            self._graphs[signature] = gm
            self._unmet.add(signature)

    @property
    def graph_module(self) -> GraphModule:
        """The graph run for the example call's signature (layer-structured where the plan structures)."""
        return self._graphs[self._first_signature]

    @property
    def flat_graph_module(self) -> GraphModule:
        """That graph as the passes left it, every op inline: what report(), diff() and dumps read."""
        return self._flat[self._first_signature]

    @property
    def example_call(self) -> tuple[tuple, dict]:
        """The (args, kwargs) the first graph was captured from."""
        return self._example

    @property
    def graphs(self) -> dict[CallSignature, GraphModule]:
        """The graph of each call signature met (the superset graph once a call has its signature)."""
        return {s: gm for s, gm in self._graphs.items() if s not in self._unmet}

    def forward(self, *args, **kwargs):
        args, kwargs = bind_call(self.compilation.source, args, kwargs)
        if self._checks_call_length:
            check_prefix_window(self.compilation.source, self.compilation.spec, call_length(kwargs))
        kwargs, output_flags = split_output_flags(kwargs)
        if wants_cache(self.compilation.source, kwargs):
            if not drops_cache(kwargs, self.training, self.plan.checkpoint_layers):
                return apply_output_flags(self._guarded_cached_call(args, kwargs), output_flags)
            kwargs = {**kwargs, "use_cache": False}  # as the original: checkpointed training keeps no cache
        elif self._caches_by_default(kwargs):
            cached = self._guarded_cached_call(args, kwargs, capture=False, checked=True)
            if cached is not None:
                return apply_output_flags(cached, output_flags)
        call = (args, kwargs)
        try:
            gm, args, kwargs = self.graph_for(args, kwargs)
            output = gm(*args, **kwargs)
        except Exception as err:  # a guard or capture failure: raise what the original model raises
            raise_call_error(runnable(self.compilation.source), *call, err)
        return apply_output_flags(output, output_flags)

    def _guarded_cached_call(self, args: tuple, kwargs: dict, capture: bool = True, checked: bool = False):
        """`_cached_call`, a graph guard's failure raised as the plain call's are (peftc.runtime.call_errors)."""
        try:
            return self._cached_call(kwargs, capture=capture, checked=checked)
        except AssertionError as err:  # torch.export's input guards: the original's error, or a CallError
            raise_call_error(runnable(self.compilation.source), args, kwargs, err)

    def _cached_call(self, kwargs: dict, graph_inputs: dict | None = None, capture: bool = True,
                     checked: bool = False):
        """A call with use_cache=True or a cache passed: its output holds a DynamicCache (runtime.forward_cache).
        `capture=False`: None where its graph would have to be captured (peftc.runtime.forward_cache);
        `checked`: the caller has refused what check_cached_call and refuse_sharded refuse. An encoder-decoder's
        holds an EncoderDecoderCache (runtime.seq2seq_forward_cache; its graphs are captured on first use)."""
        if is_encoder_decoder(self.compilation.source):
            return self._seq2seq_cached_call(kwargs, graph_inputs, checked)
        if not checked:
            check_cached_call(self.compilation.source, kwargs)
            refuse_sharded(is_sharded(self))  # every call: a model may be sharded after its first cached call
        kwargs = self._cache_slots(kwargs, graph_inputs or {})
        if self._cached_forward is None:
            derives = self._superset is not None and not self._serves_virtual_tokens()
            superset = (self._superset, self._superset_flat) if derives else None
            slots = prepended_tokens(self.compilation.spec) or (self.plan.serving and self.plan.serving.prompt_paths)
            self._cached_forward = CachedForward(self.compilation, self.plan, superset,
                                                 runtime_inputs=(CACHE_POSITION,) if slots else (),
                                                 gate_inputs=self._gate_inputs())
        return self._cached_forward(kwargs, self.training, graph_inputs, capture)

    def _seq2seq_cached_call(self, kwargs: dict, graph_inputs: dict | None, checked: bool = False):
        if not checked:
            refuse_sharded(is_sharded(self))
        spec = self.compilation.spec
        if graph_inputs or prepended_tokens(spec) or prefix_tokens(spec):
            if graph_inputs:
                raise NotImplementedError("a forward with a KV cache on a served encoder-decoder: its cached graphs "
                                          "do not route adapters. Pass use_cache=False (generate() decodes), or "
                                          "compile the adapter alone (peftc.from_peft(model, folder)) for cached calls")
            raise NotImplementedError("a forward with a KV cache on an encoder-decoder with virtual tokens (prompt or "
                                      "prefix tuning): its cached graphs do not take them. Pass use_cache=False "
                                      "(generate() decodes), or call cm.merge_and_unload() for the original model")
        if self._cached_forward is None:
            self._cached_forward = Seq2SeqCachedForward(self.compilation, self.plan)
        return self._cached_forward(kwargs, self.training)

    def _caches_by_default(self, kwargs: dict) -> bool:
        """Whether a call saying nothing of a cache runs a cached graph: where the original returns one
        (config.use_cache, not dropped by checkpointed training), the call is one a cached graph takes, and
        the graph derives from the superset capture (no export). The Inductor back end's compiled layers
        and sharded models keep their graphs: the reasons are in peftc.runtime.forward_cache's docstring."""
        source = self.compilation.source
        if is_encoder_decoder(source):
            # its cached graphs are captured, not derived: a plain call (the compile's own signature) would cost an
            # export, so it keeps its graph and returns no cache; use_cache=True or a cache passed gets one
            return False
        if self.plan.backend == "inductor" or self._superset is None or not caches_by_default(source, kwargs):
            return False
        if prepended_tokens(self.compilation.spec) or self._serves_virtual_tokens():  # no cached graph derives
            return False
        if drops_cache(kwargs, self.training, self.plan.checkpoint_layers) or is_sharded(self):
            return False
        try:
            check_cached_call(source, kwargs)
        except (TypeError, ValueError):  # the plain graph serves it (or raises the original's error)
            return False
        return covers_new_tokens(kwargs)  # else the plain graph's guards name the mask

    def _serves_virtual_tokens(self) -> bool:
        """Whether this is a served model with prompt or prefix rows: their graphs make each row's mask and positions
        from the call's, so a cached graph is captured for them (prompt_cache, virtual_inputs), not derived (the
        superset takes the explicit positions such calls pass, so nothing else would refuse the derivation)."""
        return self.plan.serving is not None and self.plan.serving.has_virtual_tokens

    def _gate_inputs(self) -> dict:
        """What the graphs take besides the model's inputs for the cache derivation's check call of 2 rows (a served
        model's adapter ids); none here."""
        return {}

    def _cache_slots(self, kwargs: dict, graph_inputs: dict) -> dict:
        """A cached call with its virtual tokens' slots, where the spec prepends some (peftc.runtime.prompt_cache)."""
        tokens = prepended_tokens(self.compilation.spec)
        if not tokens:
            return kwargs
        batch = next(kwargs[k] for k in ("input_ids", "inputs_embeds") if kwargs.get(k) is not None).shape[0]
        return with_cache_slots(kwargs, torch.full((batch,), tokens), tokens, positions=False)

    def graph_for(self, args: tuple, kwargs: dict) -> tuple[GraphModule, tuple, dict]:
        """The graph for this call's signature (built on first use) and the call, normalized."""
        args, kwargs = normalize_call(self.compilation.source, args, kwargs)
        kwargs = rows_broadcast(self.compilation.source, kwargs)  # one row of position_ids for the batch
        kwargs = positions_to_keep(self.compilation.source, kwargs)  # an int logits_to_keep as its positions
        signature = CallSignature.of(args, kwargs)
        gm = self._graphs.get(signature)
        self._unmet.discard(signature)
        if gm is None:
            gm = self._derived(signature) or self.compilation.build(args, kwargs, self.plan).graph_module
            attach_graph(self, gm, self._tree_origin)
            self.graph_built(gm)
            set_mode(gm, self.training)
            self._graphs[signature] = gm
        return gm, args, kwargs

    def _derived(self, signature: CallSignature) -> GraphModule | None:
        """This signature's graph derived from the superset graph without a capture, if it can be."""
        if self._superset is None:
            return None
        wide = CallSignature.of(*self._superset)
        return _derive(self._graphs[wide], wide, signature, self.compilation.source)

    def build_under(self, plan, call: tuple[tuple, dict] | None = None) -> FirstBuild:
        """`plan`'s graph for `call` (by default the example call), derived from the superset call this model
        was built from where it can be: that call's capture is reused (peftc.capture.captured), not redone."""
        call = call or self.example_call
        if self._superset is None:  # the example call itself was captured (or no superset could be)
            return FirstBuild(self.compilation.build(*call, plan))
        return build_first(self.compilation, call, plan, superset=self._superset)

    def graph_built(self, gm: GraphModule) -> None:
        """Hook for subclasses: a graph for a new call signature was just built."""

    # -- generation (peftc.runtime.generate) ------------------------------------------------------
    def can_generate(self) -> bool:
        can = getattr(self.compilation.source, "can_generate", None)
        return callable(can) and bool(can()) and hasattr(self.compilation.source, "generation_config")

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, **kwargs) -> torch.Tensor:
        """Generate tokens as transformers' `model.generate` does, with a StaticCache inside the graphs
        (an encoder-decoder: its encoder and decoder-step graphs, peftc.runtime.seq2seq_generate).

        Takes GenerationMixin's arguments (see peftc.runtime.generate for those implemented) and
        returns the sequences, prompt included. Greedy unless `do_sample=True`.
        """
        if not self.can_generate():
            raise TypeError(f"{type(self.compilation.source).__name__} cannot generate: generate() needs a "
                            "transformers causal language model (one whose can_generate() is True)")
        if is_sharded(self):
            raise ShardedError("generate() on a model FSDP2 (fully_shard) sharded: decoding graphs run outside "
                               "its hooks, so no rank holds the whole weights they read. Save the adapter "
                               "(cm.save_adapter(dir) on every rank) and generate on one process from "
                               "peftc.compile(base, spec) with cm.load_adapter(dir)")
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if input_ids is None:
            raise TypeError("generate() needs input_ids (the prompt token ids)")
        if is_encoder_decoder(self.compilation.source):
            if self._generator is None and self.seq2seq_cached_generate:
                self._generator = Seq2SeqGenerator(self.compilation, self.plan)
            cached = self._generator if self._generator is not None and self._generator.cached else None
            return generate_seq2seq(cached, self, self.compilation.source, input_ids, attention_mask, generation_config,
                                    **kwargs)
        if self._generator is None:
            self._generator = Generator(self.compilation, self.plan)
        return generate(self._generator, input_ids, attention_mask, generation_config, **kwargs)

    # Encoder-decoders generate over cached graphs (runtime/seq2seq_generate.py); a served model's do not
    # (its adapter banks want every site in each graph, and the encoder's graph holds no decoder site).
    seq2seq_cached_generate = True

    def train(self, mode: bool = True):
        # Exported graph modules refuse .train(); the mode lives in the graph's nodes instead.
        self.training = mode
        for gm in self._graphs.values():
            set_mode(gm, mode)
        return self

    def _apply(self, fn, recurse=True):
        before = _placement(self.graph_module)
        # The source and the adapter tree first: graphs are rebuilt from them, and a conversion
        # that cannot happen in place (to "meta") gives them new tensors the graphs do not see.
        self.compilation.source._apply(fn, recurse)
        self.compilation.adapter_root._apply(fn, recurse)
        super()._apply(fn, recurse)  # the module tree, which attached graphs share
        for gm in self._graphs.values():
            if gm is not self.graph_module and gm._parameters is not self._parameters:  # not attached
                gm._apply(fn, recurse)
        if _placement(self.graph_module) != before:
            # Graphs bake in dtypes and devices (export's tensor-metadata checks, casts, factory
            # devices): rebuild them for the new placement instead of running stale ones.
            args, kwargs = self._example
            self._example = (tuple(_convert(a, fn) for a in args), {k: _convert(v, fn) for k, v in kwargs.items()})
            self._rebuild()
        return self

    def _rebuild(self) -> None:
        """Drop every graph and build the first one again from the example call (same plan, same
        adapter parameters); other signatures and generation graphs are rebuilt on first use."""
        if self.plan.merge is not None:  # folded weights were cached in the old placement
            self.plan = replace(self.plan, merge=MergeState(self.plan.merge.options))
        superset = None
        if self._superset is not None:  # capture the superset again (from the converted example call)
            start = build_first(self.compilation, self._example, self.plan)
            first, superset = start.built, start.superset_parts()
        else:
            first = self.compilation.build(*self._example, self.plan)
        self._use_first(first, superset)
        self.graph_built(first.graph_module)
        if superset is not None:
            self.graph_built(superset[1])

    # -- copy and pickle -----------------------------------------------------------------------------
    def __getstate__(self):
        """Pickle the compilation, the plan and the example call; graphs are rebuilt on load (exported
        graph modules hold local functions pickle cannot store)."""
        state = self.__dict__.copy()
        state["_modules"], state["_parameters"], state["_buffers"] = {}, {}, {}  # the tree: rebuilt
        state["_non_persistent_buffers_set"] = set()
        for transient in ("_graphs", "_flat", "_tree_origin", "_unmet", "_generator", "_cached_forward",
                          "_superset_flat", "_method_graphs", "forward", "records", "sites"):
            state.pop(transient, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._rebuild()
        self.sign_forward()


def _derive(gm: GraphModule, wide: CallSignature, signature: CallSignature, model: nn.Module) -> GraphModule | None:
    """The graph for `signature` derived from `gm` (captured for `wide`): inputs dropped, inputs_embeds in
    place of input_ids, logits_to_keep positions taken (then the rest derived as from `gm`), or None."""
    return derive_graph(gm, wide, signature, ExtraInputs.of(model)) \
        or derive_embeds_graph(gm, wide, signature, model) \
        or derive_kept_logits_graph(gm, wide, signature, model, lambda kept, w, s: _derive(kept, w, s, model))


def _placement(gm: GraphModule) -> set:
    return {(p.device, p.dtype) for p in gm.parameters()}


def _convert(value, fn):
    """An example input after the conversion `.to()` applied to the parameters (floats cast, all moved)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(v, fn) for v in value)
    return value

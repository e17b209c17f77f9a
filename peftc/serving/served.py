"""peftc.serve_adapters: one base model, many adapters of different PEFT types, each batch row its own (PetS).

    mm = peftc.serve_adapters(model, {"sql": "adapters/sql", "chat": cm_chat})
    out = mm(input_ids=ids, adapter_ids=["sql", "chat", None])   # None / -1: the base alone

The model is captured once; the lower_lora_multi pass replaces every linear site some adapter
targets by peftc::lora_multi over per-site banks of all adapters (S-LoRA / Punica style):
BGMV kernels when each sequence has one token at the site (decode), SGMV over runs of equal ids
when it has several (prefill). Triton on CUDA, the torch implementation elsewhere. LoRA, VeRA
and DoRA's low-rank pair share those banks; lower_scales_multi then applies the elementwise
methods (IA3's vectors, DoRA's magnitude factor) as per-row vectors gathered by id, and
lower_bottleneck_multi the bottleneck adapters from gathered banks. Prompt-tuning and
prefix-tuning rows get their own virtual tokens (lower_prompt_multi) or attention keys and
values (lower_prefix_multi) from banks gathered by id, with per-row masks and positions. The base
ops run once for the whole batch; each adapter's ops only change its own rows.

With prompt adapters served, every row's output gains W leading positions, W the most virtual
tokens any served prompt has: a row's own N are the last N of them (the others are masked
padding), so `out.logits[:, W:]` are the tokens' logits for every row, and a row's last N + S
positions equal its own compiled model's output.

How the ids reach the graph: as data. add_routing_input gives each served graph one more
keyword input, `adapter_ids` (int64 [batch], -1 for the base), and the multi-adapter ops read
that placeholder; the wrapper checks the caller's ids (peftc.serving.routing) and passes them
with the model's own inputs. Nothing is stored per call, so threads may share one served model,
and `export_onnx(mm, path)` keeps the ids as an ONNX input (Plan.serve_export). A call with
`use_cache=True` or a cache passed returns a DynamicCache as a compiled model's does (its graphs,
peftc.runtime.forward_cache, built by the serving plan, the ids one more input). Prefix rows work
there as a compiled prefix model's cached forward does: the cache holds the tokens' keys and values
only, every call adds the row's prefix at each attention op and counts the row's positions from its
N (so all rows share one cache length, whatever their prefixes). Prompt rows as a compiled prompt
model's (peftc.runtime.prompt_cache): the call that starts the cache puts W slots first, each row's
own N virtual tokens the last N of them, so the cache holds W + S entries for every row; a call
continuing it adds no virtual tokens, and its mask covers the caller's tokens (or the whole cache).

As peftc.compile, serve_adapters captures the superset call (peftc.compiler.first_build): calls adding labels or
output flags derive their graph (the routing input stays), and without prompt or prefix rows so does the cached
forward, so a plain call of a causal LM returns the cache where config.use_cache is on, as the original's does.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import torch
from torch import nn

from peftc.capture.binding import bind_call
from peftc.capture.captured import CapturedGraphs
from peftc.capture.example_inputs import example_call
from peftc.compiler.compilation import Compilation
from peftc.compiler.first_build import build_first
from peftc.errors import SpecError
from peftc.inspect.report import Report
from peftc.ir.lora_bank import LoraBank, ServingPlan
from peftc.passes.lower_lora_multi import SLOT
from peftc.runtime.call_contract import apply_output_flags, split_output_flags
from peftc.runtime.dispatch import GraphDispatch
from peftc.runtime.forward_cache import wants_cache
from peftc.runtime.prompt_cache import with_cache_slots
from peftc.runtime.user_model import weight_view
from peftc.serving.routing import adapter_index, check_adapter_names
from peftc.serving.sources import load_adapter
from peftc.serving.virtual_inputs import with_cached_positions, with_prompt_slots, with_virtual_inputs

BACKENDS = ("triton",)


def serve_adapters(model: nn.Module, adapters_by_name: Mapping[str, Any], *, backend: str = "triton",
                   example_inputs: Any = None, example_kwargs: dict | None = None) -> "ServedModel":
    """A module running `model` with any of `adapters_by_name` per batch row.

    Values: a CompiledModel, a folder written by `cm.save_adapter(dir)`, or a PEFT adapter folder;
    each one entry of LoRA, DoRA, VeRA, IA3 or a bottleneck adapter on linear layers, or of prompt or
    (ungated) prefix tuning. Methods, ranks, alphas, targets and virtual-token counts may differ per adapter.
    The model itself is not changed (its parameters keep their requires_grad flags).
    """
    if backend not in BACKENDS:
        raise SpecError(f"backend: expected one of {list(BACKENDS)} (Triton kernels on CUDA, their torch "
                        f"implementation elsewhere), got {backend!r}")
    check_adapter_names(adapters_by_name, "serve_adapters", "adapter_dir_or_CompiledModel")
    example = example_call(model, example_inputs, example_kwargs)
    captured = CapturedGraphs(across_views=True)  # one model, one call: the folders' compiles export it once
    loaded = tuple(load_adapter(name, source, model, example, captured) for name, source in adapters_by_name.items())
    # capture flips the view's modes, not the user's
    compilation = Compilation.start(weight_view(model), None, captured=captured)
    plan = compilation.serve_plan(ServingPlan(loaded))
    if plan.serving.has_virtual_tokens:
        example = with_virtual_inputs(model, *example)
    start = build_first(compilation, example, plan)  # the superset call: later signatures derive (first_build)
    return ServedModel(compilation, plan, start.built, example, training=model.training,
                       superset=start.superset_parts())


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class ServedModel(GraphDispatch):
    """`serve_adapters`' result: call it as the model, plus `adapter_ids` (one per batch row)."""

    seq2seq_cached_generate = False  # see GraphDispatch: encoder-decoders decode over the served forward

    def __init__(self, compilation, plan, first, example, *, training, superset=None):
        super().__init__(compilation, plan, first, example, training=training, superset=superset)
        self.adapter_names = [a.name for a in plan.serving.adapters]
        self._prompt_lengths = prompt_lengths(plan.serving.adapters)  # fixed with the adapters: read every step
        self._prompt_width = int(self._prompt_lengths.max())
        object.__setattr__(self, "_build_lock", threading.Lock())

    def graph_for(self, args: tuple, kwargs: dict):
        """As GraphDispatch's, one build at a time: threads meeting a new call signature together
        build its graph once (torch.export is not safe to run concurrently on one model)."""
        with self._build_lock:
            return super().graph_for(args, kwargs)

    def __getstate__(self):  # a lock does not pickle or deepcopy; each copy gets its own
        state = super().__getstate__()  # graphs are rebuilt (a derived graph's guards hold what does not copy)
        state.pop("_build_lock", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        object.__setattr__(self, "_build_lock", threading.Lock())

    def forward(self, *args, adapter_ids: Any = None, **kwargs):
        ids = self.adapter_index(adapter_ids, batch_size(args, kwargs)).to(_device(self.compilation.source))
        args, kwargs = bind_call(self.compilation.source, args, kwargs)  # as the graphs were captured (a full mask)
        kwargs, output_flags = split_output_flags(kwargs)
        if wants_cache(self.compilation.source, kwargs):
            return apply_output_flags(self._served_cached_call(kwargs, ids), output_flags)
        if self._caches_by_default(kwargs):  # a plain call returns the cache where its graph derives (no export)
            cached = self._served_cached_call(kwargs, ids, capture=False)
            if cached is not None:
                return apply_output_flags(cached, output_flags)
        if self.plan.serving.has_virtual_tokens:
            args, kwargs = with_virtual_inputs(self.compilation.source, args, kwargs)
        gm, args, kwargs = self.graph_for(args, kwargs)
        return apply_output_flags(gm(*args, **kwargs, adapter_ids=ids), output_flags)

    def _served_cached_call(self, kwargs: dict, ids: torch.Tensor, capture: bool = True):
        """A call with use_cache=True or a cache passed, as a compiled model's (peftc.runtime.forward_cache):
        the cached-forward graphs built by this model's serving plan take the ids as one more input.
        `capture=False`: None where the graph would have to be captured (GraphDispatch._caches_by_default)."""
        if self.plan.serving.prefix_paths and not self.plan.serving.prompt_paths:  # else with_cache_slots places them
            kwargs = with_cached_positions(self.compilation.source, kwargs)  # the graph adds each prefix row's N
        with self._build_lock:  # the first call of a signature captures its graph
            return self._cached_call(kwargs, {"adapter_ids": ids}, capture=capture, checked=not capture)

    def _gate_inputs(self) -> dict:
        """The cache derivation's check call (2 rows) runs the first and the last served adapter, one row each."""
        last = len(self.adapter_names) - 1
        return {"adapter_ids": torch.tensor([0, last], device=_device(self.compilation.source))}

    def _cache_slots(self, kwargs: dict, graph_inputs: dict) -> dict:
        """With prompt adapters served, a cached call gets `width` slots, each row's own N visible, on the call
        that starts the cache, and every call each row's positions (peftc.runtime.prompt_cache)."""
        if not self._prompt_width:
            return kwargs
        return with_cache_slots(kwargs, self._rows_prompt_lengths(graph_inputs["adapter_ids"]), self._prompt_width,
                                positions=True)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 generation_config=None, *, adapter_ids: Any = None, **kwargs) -> torch.Tensor:
        """Generate as the model's `generate` (see GraphDispatch.generate), each row with its adapter.

        The prefill and decode graphs are this model's serving graphs over a StaticCache, the ids one
        more input of each step. Rows of prompt adapters get their virtual tokens in the cache first;
        the sequences returned are the caller's prompt and the new tokens, as `model.generate` gives.
        Calls run one at a time (the cache buffers are shared by calls of one shape)."""
        if input_ids is None:
            input_ids = kwargs.pop("inputs", None)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise TypeError("generate() needs input_ids [batch, seq] (the prompt token ids)")
        ids = self.adapter_index(adapter_ids, input_ids.shape[0]).to(input_ids.device)
        width = self._prompt_width
        position_mask = None
        if width:
            input_ids, attention_mask, position_mask = with_prompt_slots(
                input_ids, attention_mask, self._rows_prompt_lengths(ids), width)
        call = dict(graph_inputs={"adapter_ids": ids}, position_mask=position_mask, slots=width, **kwargs)
        if getattr(getattr(self.compilation.source, "config", None), "is_encoder_decoder", False):
            # decoded over forward calls (peftc.runtime.seq2seq_generate), each taking the lock itself
            return super().generate(input_ids, attention_mask, generation_config, **call)
        with self._build_lock:
            return super().generate(input_ids, attention_mask, generation_config, **call)

    def _rows_prompt_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """Each row's number of virtual tokens, on the ids' device (indexing there: no copy back to the host)."""
        return self._prompt_lengths.to(ids.device)[ids]  # -1, the base: the last entry, 0

    def adapter_index(self, adapter_ids: Any, batch: int) -> torch.Tensor:
        """The ids as bank indices (int64 [batch], -1 for the base); SpecError naming a bad id."""
        return adapter_index(adapter_ids, self.adapter_names, batch)

    def banks(self) -> dict[str, LoraBank]:
        """The LoRA bank of every served site, by site path."""
        return {name[: -len(SLOT) - 1]: m for name, m in self.compilation.adapter_root.named_modules()
                if isinstance(m, LoraBank)}

    def report(self, scope: str | None = None) -> Report:
        """What the passes did, with one row per adapter: its id, method and sites."""
        return Report.build(self, scope)

    def __repr__(self) -> str:  # the graph modules' own repr would list every layer
        banks = self.banks()
        ranks = sorted({bank.A_bank.shape[1] for bank in banks.values()})
        return (f"ServedModel({type(self.compilation.source).__name__}, "
                f"adapters={len(self.adapter_names)} {self.adapter_names}, "
                f"sites={len(banks)}, bank ranks={ranks})")


def prompt_lengths(adapters) -> torch.Tensor:
    """Each served adapter's number of prompt-tuning virtual tokens (0 if none), then the base's 0."""
    return torch.tensor([next((s.prompt.shape[0] for s in a.sites.values() if s.prompt is not None), 0)
                         for a in adapters] + [0])


def batch_size(args: tuple, kwargs: dict) -> int:
    """The leading dim of the first tensor argument: the batch the ids index."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise SpecError("adapter_ids: no tensor argument to read the batch size from")

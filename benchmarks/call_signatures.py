"""The cost of a call signature the compiled model has not seen, against the compile itself (CPU).

    python benchmarks/call_signatures.py [--repeats 3]

The lora_llama.py model and spec. Each row is a variation of the compiled call (input_ids +
attention_mask): ones that map to the compiled graph (positional ids, no mask, return_dict=False,
arguments equal to their defaults), ones whose graph is derived from the superset capture
without exporting (labels, Trainer's labels + num_items_in_batch, output_hidden_states,
output_attentions, position_ids; see peftc.capture.specialize; inputs_embeds in place of
input_ids: peftc.capture.embeds_input; logits_to_keep, its positions a graph input:
peftc.capture.kept_logits), and a forward with use_cache=True,
whose graph takes and returns each layer's keys and values (peftc.runtime.forward_cache: derived
from the superset capture and checked once per model, peftc.runtime.cache_derivation; a capture
where it cannot be). Reported: the time to bind the call and get its graph (`cm.graph_for`: what
meeting the signature costs, without the forward's own time, which is noise on a loaded machine;
for use_cache=True, which runs its own graphs, CachedForward.graph_for on a fresh CachedForward, and
apart the first call's own time, graph and forward), medians
over fresh compiles, as a share of the compile time. Also the compile time with the superset
capture turned off, i.e. what compiling cost before it: one warm-up compile first, then the two
compiles alternate, each repeat swapping which goes first.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

import torch
from common import machine
from lora_llama import build, lora_spec

import peftc
from peftc.capture.binding import bind_call
from peftc.compiler import first_build
from peftc.runtime.call_contract import split_output_flags
from peftc.runtime.forward_cache import CachedForward, wants_cache

IDS = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
EMBEDS = torch.randn(4, 128, 512, generator=torch.Generator().manual_seed(1))  # lora_llama's hidden size
CACHED = "use_cache=True (a KV-cache graph, derived from the superset and checked)"
VARIATIONS = {
    "positional ids, no mask": ((IDS,), {}),
    "return_dict=False": ((), {"input_ids": IDS, "return_dict": False}),
    "defaults spelled out": ((), {"input_ids": IDS, "attention_mask": None, "labels": None, "position_ids": None}),
    "labels (derived)": ((), {"input_ids": IDS, "labels": IDS}),
    "labels + num_items_in_batch, Trainer's call (derived)":
        ((), {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS,
              "num_items_in_batch": torch.tensor(508)}),
    "output_hidden_states (derived)": ((), {"input_ids": IDS, "output_hidden_states": True}),
    "output_attentions (derived)": ((), {"input_ids": IDS, "output_attentions": True}),
    "output_hidden_states + labels (derived)": ((), {"input_ids": IDS, "output_hidden_states": True, "labels": IDS}),
    "output_hidden_states=False, output_attentions=False (the config's: same graph)":
        ((), {"input_ids": IDS, "output_hidden_states": False, "output_attentions": False}),
    "position_ids (derived)": ((), {"input_ids": IDS, "position_ids": torch.arange(128).expand(4, -1) + 3}),
    "position_ids + labels + output_hidden_states (derived)":
        ((), {"input_ids": IDS, "position_ids": torch.arange(128).expand(4, -1), "labels": IDS,
              "output_hidden_states": True}),
    "inputs_embeds in place of input_ids (derived)": ((), {"inputs_embeds": EMBEDS}),
    "inputs_embeds + attention_mask + labels (derived)":
        ((), {"inputs_embeds": EMBEDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}),
    "logits_to_keep=1 (derived)": ((), {"input_ids": IDS, "logits_to_keep": 1}),
    "logits_to_keep=positions + labels (derived)":
        ((), {"input_ids": IDS, "logits_to_keep": torch.arange(96, 128), "labels": IDS[:, 96:]}),
    CACHED: ((), {"input_ids": IDS, "use_cache": True}),
}


def meet(cm, args: tuple, kwargs: dict, first_calls: list) -> float:
    """Seconds to bind the call and get its graph (built on first use), as cm(...) does before running it."""
    start = time.perf_counter()
    bound_args, bound = bind_call(cm.compilation.source, args, kwargs)
    bound, _ = split_output_flags(bound)
    if not wants_cache(cm.compilation.source, bound):
        cm.graph_for(bound_args, bound)
        return time.perf_counter() - start
    # A cached call runs its own graphs (runtime.forward_cache): get its graph as cm(...) would, on a
    # CachedForward of its own (derived and checked, or captured); then time the whole first call apart.
    forward = CachedForward(cm.compilation, cm.plan, (cm._superset, cm._superset_flat))
    forward.graph_for({k: v for k, v in bound.items() if k != "use_cache"})
    met = time.perf_counter() - start
    start = time.perf_counter()
    cm(*args, **kwargs)
    first_calls.append(time.perf_counter() - start)
    return met


def timed_compile(full, spec) -> tuple[float, object]:
    gc.collect()  # the previous compiled models' graphs are freed before the clock starts
    start = time.perf_counter()
    cm = peftc.compile(copy.deepcopy(full), spec).eval()
    return time.perf_counter() - start, cm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    full = build()
    spec = lora_spec()
    compile_s, plain_compile_s, met, first_cached = [], [], {name: [] for name in VARIATIONS}, []
    with_superset = first_build.superset_calls
    timed_compile(full, spec)  # warm-up: the first compile in a process pays torch's own first-use costs
    for repeat in range(args.repeats):  # alternated: a compile with the superset, one without
        for superset in ((True, False) if repeat % 2 == 0 else (False, True)):
            if not superset:
                first_build.superset_calls = lambda *a, **k: []
                try:
                    plain_compile_s.append(timed_compile(full, spec)[0])
                finally:
                    first_build.superset_calls = with_superset
                continue
            seconds, cm = timed_compile(full, spec)
            compile_s.append(seconds)
            with torch.no_grad():
                for name, (call_args, call_kwargs) in VARIATIONS.items():
                    met[name].append(meet(cm, call_args, call_kwargs, first_cached))
            del cm
    base = statistics.median(compile_s)
    print(f"compile: {base:.2f} s; without the superset capture: {statistics.median(plain_compile_s):.2f} s "
          f"(medians of {args.repeats})")
    for name, times in met.items():
        t = statistics.median(times)
        print(f"  new signature, {name}: {t:.3f} s = {t / base:.1%} of compile")
    t = statistics.median(first_cached)
    print(f"  the first use_cache=True call itself (graph + its forward): {t:.3f} s = {t / base:.1%} of compile")


if __name__ == "__main__":
    main()

"""Training calls and the KV cache: what returning one (as the original does) would cost a training step.

    python benchmarks/forward_cache_training.py [--repeats 5] [--checkpointing]

The lora_llama.py model and spec (LoRA r=16 on the 7 projections), batch 4 x 128, training mode, AdamW.
transformers returns a DynamicCache from a training call too (config.use_cache, unless gradient
checkpointing is on). A compiled model's training call runs the layer-structured training graph
(checkpointing, FSDP2 per layer, the Inductor back end's compiled layers); a cache comes only from
the cached graph (peftc.runtime.forward_cache: the flat graph, derived from the superset capture).
Reported, alternated: step time (process CPU) and the step's peak live tensor bytes
(peftc.inspect.memory) for peftc with use_cache=False (the layer-structured training graph), peftc's
plain training call (the cached graph, returning the original's cache; under --checkpointing the
original drops the cache and so does peftc: the layer-structured graph again), and PEFT's plain call.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import alternate, llama_config, machine
from lora_llama import lora_spec, peft_lora

import peftc
from peftc.inspect.memory import peak_live_bytes

IDS = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))


def training_step(model, **flags):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = model(input_ids=IDS, labels=IDS, **flags)
        out.loss.backward()  # `out` (and any cache in it) alive through the backward, as in a user's loop
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--kv-heads", type=int, default=8, help="fewer than the 8 query heads: grouped-query attention")
    args = parser.parse_args()
    print(f"machine: {machine()}; checkpointing: {args.checkpointing}; kv heads: {args.kv_heads}")
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    full = LlamaForCausalLM(llama_config(num_key_value_heads=args.kv_heads))
    cm = peftc.compile(copy.deepcopy(full), lora_spec()).train()
    hf = peft_lora(full).train()
    if args.checkpointing:
        cm.gradient_checkpointing_enable()
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = {"peftc use_cache=False (layer-structured graph, no cache)": training_step(cm, use_cache=False),
             "peftc plain (cached graph: returns a cache)": training_step(cm),
             "peft plain (returns a cache)": training_step(hf)}
    times = alternate(steps, args.repeats, clock=time.process_time)
    base = times["peftc use_cache=False (layer-structured graph, no cache)"]
    for name, step in steps.items():
        peak = peak_live_bytes(step).peak
        print(f"train step, {name}: {times[name] * 1e3:.1f} ms CPU ({times[name] / base:.3f} of use_cache=False), "
              f"peak live {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()

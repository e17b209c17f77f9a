"""Forward calls with a KV cache (use_cache=True / past_key_values=): cost against the compile and against PEFT.

    python benchmarks/forward_cache.py [--repeats 5] [--steps 16] [--attn eager]

The lora_llama.py model and spec (LoRA r=16 on the 7 projections), batch 4 x 128, eval mode;
`--attn eager`: the same model with transformers' eager attention (its cached graph derives too).
Reported:
- compile time, and the first `cm(ids, attention_mask=mask, use_cache=True)` (the cache graph
  derived from the superset capture and checked, peftc.runtime.cache_derivation, or captured where
  it cannot be; plus one forward), as a share of it;
- eval forward, process CPU time, alternated medians: the base model's plain call (which returns a
  cache), peftc with use_cache=False (the plain graph, no cache), peftc's plain call (the cached graph:
  it returns a cache, as the original does), PEFT's plain call (which returns one);
- bytes the output holds: logits, and the cache a plain call would return;
- a manual greedy decoding loop (cache passed back each step): ms per token, peftc vs PEFT.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import alternate, machine
from lora_llama import build, lora_spec, peft_lora

import peftc

IDS = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)


def decode_loop(model, steps: int):
    def run():
        with torch.no_grad():
            out = model(input_ids=IDS, attention_mask=MASK, use_cache=True)
            mask = MASK
            for _ in range(steps):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    return run


def plain(model, **flags):
    def run():
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK, **flags)
    return run


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    args = parser.parse_args()
    print(f"machine: {machine()}; attention: {args.attn}")
    full = build()
    full.config._attn_implementation = args.attn
    spec = lora_spec()
    start = time.perf_counter()
    cm = peftc.compile(copy.deepcopy(full), spec).eval()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        out = cm(input_ids=IDS, attention_mask=MASK, use_cache=True)
    first_s = time.perf_counter() - start
    print(f"compile {compile_s:.2f} s; first use_cache=True call {first_s:.2f} s = {first_s / compile_s:.1%} of compile")
    cache = out.past_key_values
    cache_bytes = tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
    print(f"output bytes: logits {tensor_bytes([out.logits]) / 2**20:.1f} MiB, cache {cache_bytes / 2**20:.1f} MiB")

    hf = peft_lora(full).eval()
    forward = alternate({"base model plain (returns a cache)": plain(full),
                         "peftc use_cache=False (no cache)": plain(cm, use_cache=False),
                         "peftc plain (returns a cache, as the original)": plain(cm),
                         "peft plain (returns a cache)": plain(hf)}, args.repeats, clock=time.process_time)
    base = forward["base model plain (returns a cache)"]
    for name, seconds in forward.items():
        print(f"eval forward, {name}: {seconds * 1e3:.1f} ms CPU ({seconds / base:.3f} of the base model)")
    loop = alternate({"peft": decode_loop(hf, args.steps), "peftc": decode_loop(cm, args.steps)}, args.repeats,
                     warmup=1, clock=time.process_time)
    per_token = {name: seconds / args.steps * 1e3 for name, seconds in loop.items()}
    print(f"manual decoding loop (prefill + {args.steps} steps, cache passed back), CPU ms per step: "
          f"peft {per_token['peft']:.1f}, peftc {per_token['peftc']:.1f}, peftc/peft {loop['peftc'] / loop['peft']:.3f}")


if __name__ == "__main__":
    main()

"""generate() time per new token: peftc (StaticCache in the graph) vs HF PEFT's generate (its cache), CPU fp32.

    python benchmarks/generate.py [--repeats 5] [--new-tokens 32]

The lora_llama.py model and spec; a batch of 2 prompts of 16 tokens (one left-padded by 4),
greedy. Both run in this process, alternated, medians; each contender's first call (peftc
captures its two generation graphs there) is a warm-up and not timed; it is reported apart.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import peftc
from common import alternate, machine
from lora_llama import build, lora_spec, peft_lora


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    full = build()
    spec = lora_spec()
    hf = peft_lora(full).eval()
    start = time.perf_counter()
    ours = peftc.compile(copy.deepcopy(full), spec).eval()
    compile_s = time.perf_counter() - start
    ids = torch.randint(1, 4000, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    n = args.new_tokens
    options = {"attention_mask": mask, "max_new_tokens": n, "do_sample": False}
    start = time.perf_counter()
    first = ours.generate(ids, **options)
    first_s = time.perf_counter() - start
    same = torch.equal(first, hf.generate(input_ids=ids, pad_token_id=0, **options))

    def run_peft():
        with torch.no_grad():
            hf.generate(input_ids=ids, pad_token_id=0, **options)

    contenders = {"peft": run_peft, "peftc": lambda: ours.generate(ids, **options)}
    print(f"compile {compile_s:.2f} s; first generate (captures 2 graphs) {first_s:.2f} s; tokens equal: {same}")
    for clock_name, clock in (("wall", time.perf_counter), ("process CPU", time.process_time)):
        times = alternate(contenders, args.repeats, warmup=1, clock=clock)
        per_token = {k: v / n for k, v in times.items()}
        print(f"ms per new token ({clock_name}, {n} tokens, batch 2): peft {1e3 * per_token['peft']:.2f}  "
              f"peftc {1e3 * per_token['peftc']:.2f}   peftc/peft {per_token['peftc'] / per_token['peft']:.3f}")


if __name__ == "__main__":
    main()

"""The first use_cache=True call of a sliding-window model, as a share of its compile: captured vs derived.

    OMP_NUM_THREADS=1 python benchmarks/sliding_cache.py [--repeats 3]

Mistral with lora_llama.py's sizes (hidden 512, 4 layers, 8 heads) and `sliding_window=64`, LoRA
lora_spec(); batch 4 x 128 (a prompt twice the window), eval mode. Each repeat compiles afresh and times
the first `cm(ids, attention_mask=mask, use_cache=True)`, alternating "derived" (peftc's default now:
peftc.runtime.cache_derivation with a sliding-window mask per layer) and "captured" (the derivation
refused, as before: one torch.export of the cached call). Medians.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import time
from unittest import mock

import torch
from common import machine
from lora_llama import lora_spec

import peftc
from peftc.runtime.cache_derivation import CacheDerivation

IDS = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=4000, max_position_embeddings=512, sliding_window=64)
    return MistralForCausalLM(config).eval()


@torch.no_grad()
def first_call_share(derived: bool) -> tuple[float, float]:
    start = time.perf_counter()
    cm = peftc.compile(mistral(), lora_spec()).eval()
    compile_s = time.perf_counter() - start
    refused = mock.patch.object(CacheDerivation, "derive", lambda self, inputs: None)
    with contextlib.nullcontext() if derived else refused:
        start = time.perf_counter()
        out = cm(IDS, attention_mask=MASK, use_cache=True)
        first_s = time.perf_counter() - start
    assert out.past_key_values is not None
    assert any(gm.meta.get("peftc_cache_derived", False) for gm in cm._cached_forward.graphs.values()) == derived
    return compile_s, first_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(machine(), "| load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    runs: dict[str, list] = {"captured": [], "derived": []}
    for _ in range(args.repeats):
        for name in runs:  # alternated
            runs[name].append(first_call_share(name == "derived"))
            compile_s, first_s = runs[name][-1]
            print(f"{name}: compile {compile_s:.2f} s, first use_cache=True call {first_s:.2f} s", flush=True)
    for name, results in runs.items():
        compile_s = statistics.median(c for c, _ in results)
        first_s = statistics.median(f for _, f in results)
        print(f"{name}: median compile {compile_s:.2f} s, first call {first_s:.2f} s = {first_s / compile_s:.1%}")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()

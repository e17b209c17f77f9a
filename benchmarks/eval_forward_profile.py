"""Where the unmerged eval forward spends its time beside the base model: torch.profiler, GEMMs and the rank-16 ones.

    cd benchmarks && OMP_NUM_THREADS=1 python eval_forward_profile.py

lora_llama.py's model and spec, batch 4 x 128, no grad; base and peftc alternated twice, 3 forwards per
profile, self CPU per forward.
"""

from __future__ import annotations

import copy

import torch
from lora_llama import build, lora_spec
from torch.profiler import ProfilerActivity, profile

import peftc

GEMMS = ("aten::mm", "aten::addmm")
RANK = 16  # lora_spec()'s r: the GEMMs with a dim of this size are the adapter's shrinks and expands
CALLS = 3


def run(model, ids):
    with torch.no_grad():
        model(input_ids=ids)


def profiled(model, ids) -> str:
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(CALLS):
            run(model, ids)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / CALLS / 1e3
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMMS) / CALLS / 1e3
    count = sum(e.count for e in events if e.key in GEMMS) // CALLS
    thin = sum(e.self_cpu_time_total for e in prof.key_averages(group_by_input_shape=True)
               if e.key in GEMMS and any(RANK in shape for shape in e.input_shapes if shape)) / CALLS / 1e3
    return f"total self CPU {total:.1f} ms/forward, GEMMs {gemm:.1f} ms ({count} calls), rank-{RANK} GEMMs {thin:.1f} ms"


def main() -> None:
    base = build().eval()
    cm = peftc.compile(copy.deepcopy(base), lora_spec()).eval()
    for name, p in cm.named_parameters():
        if "lora" in name:  # non-zero adapters: the expands do real work
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
    for model in (base, cm, base, cm):
        run(model, ids)
    for name, model in (("base", base), ("peftc", cm), ("base", base), ("peftc", cm)):
        print(f"{name}: {profiled(model, ids)}")


if __name__ == "__main__":
    main()

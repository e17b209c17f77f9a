"""Where the unmerged eval forward spends its time beside the base model: torch.profiler, GEMMs and the rank-16 ones.

    cd benchmarks && OMP_NUM_THREADS=1 python eval_forward_profile.py
"""
import copy
import sys

import torch
sys.path.insert(0, ".")  # run from benchmarks/, as the other scripts
from lora_llama import build, lora_spec
import peftc
from torch.profiler import profile, ProfilerActivity
full = build().eval()
cm = peftc.compile(copy.deepcopy(full), lora_spec()).eval()
for n, p in cm.named_parameters():
    if "lora" in n: torch.nn.init.normal_(p, std=0.02)
ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
def run(m):
    with torch.no_grad(): m(input_ids=ids)
for m in (full, cm): run(m); run(m)
for name, m in (("base", full), ("peftc", cm), ("base", full), ("peftc", cm)):
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3): run(m)
    ev = prof.key_averages(group_by_input_shape=False)
    tot = sum(e.self_cpu_time_total for e in ev) / 3e3
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")) / 3e3
    calls = sum(e.count for e in ev if e.key in ("aten::mm", "aten::addmm")) // 3
    thin = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm","aten::addmm") and e.input_shapes and any(16 in s for s in e.input_shapes if s)]
    thin_t = sum(e.self_cpu_time_total for e in thin) / 3e3
    print(f"{name}: total self CPU {tot:.1f} ms/call, GEMMs {mm:.1f} ms ({calls} calls), of which rank-16 GEMMs {thin_t:.1f} ms")

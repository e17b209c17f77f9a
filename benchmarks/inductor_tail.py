"""The top graph's tail alone: final RMSNorm, LM head, shift and cross entropy, eager vs torch.compile'd.

    OMP_NUM_THREADS=1 python benchmarks/inductor_tail.py [--rounds 2]

What compiling the tail of backend="inductor"'s top graph as its own region would save warm and cost
cold (issue 14): inductor.py's shapes ([4, 128, 512] hidden states, vocabulary 4000), forward +
backward. "eager" is what peftc runs today (its lowered `peftc::cross_entropy`); "compiled" is the same
maths under torch.compile with aten's cross entropy, which Inductor fuses. Each mode runs in a fresh
process with an empty Inductor cache, alternated; cold = its first call, warm = median of 20 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from peftc.ir.cross_entropy import cross_entropy

VOCAB = 4000


def tail(h, norm_weight, head_weight, labels, lowered: bool):
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight
    logits = F.linear(x, head_weight)[:, :-1].reshape(-1, VOCAB)
    targets = labels[:, 1:].reshape(-1)
    return cross_entropy(logits, targets, 1, -100) if lowered else F.cross_entropy(logits, targets)


def one(mode: str) -> None:
    torch.manual_seed(0)
    h = torch.randn(4, 128, 512, requires_grad=True)
    norm_weight, head_weight = torch.ones(512), torch.randn(VOCAB, 512) * 0.02
    labels = torch.randint(0, VOCAB, (4, 128))
    fn = (lambda *a: tail(*a, lowered=True)) if mode == "eager" else torch.compile(lambda *a: tail(*a, lowered=False))
    start, cpu = time.perf_counter(), time.process_time()
    fn(h, norm_weight, head_weight, labels).backward()
    cold = (time.perf_counter() - start, time.process_time() - cpu)
    walls, cpus = [], []
    for i in range(25):
        start, cpu = time.perf_counter(), time.process_time()
        fn(h, norm_weight, head_weight, labels).backward()
        h.grad = None
        if i >= 5:
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
    print(json.dumps({"mode": mode, "cold_wall_s": cold[0], "cold_cpu_s": cold[1],
                      "warm_wall_ms": statistics.median(walls) * 1e3, "warm_cpu_ms": statistics.median(cpus) * 1e3}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", default=None)
    args = parser.parse_args()
    if args.one:
        return one(args.one)
    for _ in range(args.rounds):
        for mode in ("eager", "compiled"):
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
                       "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
                out = subprocess.run([sys.executable, __file__, "--one", mode], env=env, check=True,
                                     capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
                  + f" (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()

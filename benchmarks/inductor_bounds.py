"""What bounds backend="inductor"'s warm step against torch.compile(PEFT) (issue 14): four measurements.

    OMP_NUM_THREADS=1 python benchmarks/inductor_bounds.py profile [--rounds 7]  # alternated + torch.profiler
    OMP_NUM_THREADS=1 python benchmarks/inductor_bounds.py fixed                 # batch 1 x 8: dispatch cost
    OMP_NUM_THREADS=1 python benchmarks/inductor_bounds.py gemm                  # the GEMMs every contender runs
    OMP_NUM_THREADS=1 python benchmarks/inductor_bounds.py loss                  # eager vs compiled cross entropy

inductor.py's configuration. Times are process CPU (ms) unless the profiler's table says otherwise.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from inductor import IDS, build, contender, step_fn

from peftc.ir.cross_entropy import cross_entropy

PAIR = ("peftc_inductor", "peft_compiled")


def cpu_ms(fn, n: int = 30) -> float:
    for _ in range(3):
        fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e3


def alternated(ids: torch.Tensor, rounds: int) -> dict:
    full = build(4)
    steps = {name: step_fn(contender(name, 4, full), ids) for name in PAIR}
    for _ in range(2):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in PAIR}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.process_time()
            step()
            times[name].append(time.process_time() - start)
    print(f"load {os.getloadavg()[0]:.2f}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items()))
    return steps


def profile(rounds: int) -> None:
    from torch.profiler import profile as torch_profile
    for name, step in alternated(IDS(), rounds).items():
        with torch_profile() as prof:
            for _ in range(3):
                step()
        print(f"===== {name}, 3 steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


def fixed() -> None:
    steps = alternated(torch.randint(0, 4000, (1, 8), generator=torch.Generator().manual_seed(0)), 30)
    for name, step in steps.items():
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            step()
        prof.disable()
        print(f"===== {name}, 20 steps")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)


def gemm() -> None:
    x, w, a, wide, head = (torch.randn(512, 512), torch.randn(512, 512), torch.randn(16, 512),
                           torch.randn(1376, 512), torch.randn(4000, 512))
    attn, mlp, lora = cpu_ms(lambda: x @ w.t()), cpu_ms(lambda: x @ wide.t()), cpu_ms(lambda: x @ a.t())
    lm = cpu_ms(lambda: x @ head.t())
    per_layer = 2 * (4 * attn + 3 * mlp) + 7 * 6 * lora  # forward + input gradient; 6 rank-16 GEMMs a site
    print(f"[512x512x512] {attn:.2f}, [512x512x1376] {mlp:.2f}, [512x512x16] {lora:.3f}, LM head {lm:.2f} ms; "
          f"per layer {per_layer:.1f} ms; 4 layers + LM head forward and input gradient {4 * per_layer + 2 * lm:.0f} ms"
          f" (load {os.getloadavg()[0]:.2f})")


def loss() -> None:
    logits = torch.randn(512, 4000, requires_grad=True)
    target = torch.randint(0, 4000, (512,))
    compiled = torch.compile(lambda z, t: F.cross_entropy(z, t, reduction="sum"))
    for name, fn in (("peftc eager", lambda z, t: cross_entropy(z, t, 2, -100)), ("torch.compile", compiled)):
        def step(fn=fn):
            logits.grad = None
            fn(logits, target).backward()
        print(f"{name} cross entropy forward + backward: {cpu_ms(step, 40):.2f} ms (load {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("profile", "fixed", "gemm", "loss"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    {"profile": lambda: profile(args.rounds), "fixed": fixed, "gemm": gemm, "loss": loss}[args.what]()


if __name__ == "__main__":
    main()

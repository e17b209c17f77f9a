"""Concurrent multi-adapter training (mLoRA): K adapters in one batch vs the same steps one after another.

    python benchmarks/train_adapters.py [--repeats 5] [--seq 32] [--clock cpu]

A LLaMA-style model (hidden 512, 4 layers, fp32) and K = 4 LoRA adapters (ranks 8 and 16, each
on different projections). One training step (forward with labels, backward, AdamW step) on a
batch of 4 adapters x 4 rows:
  together     `peftc.train_adapters(model, {...})` on all 16 rows, each row its adapter
  one by one   each adapter's own `peftc.compile` model on its 4 rows, four steps in turn
Contenders alternate round by round; medians. `--clock cpu` counts this process's CPU time (less
noisy on a shared machine than the wall clock). The issue's goal: together <= 0.6x one by one.

Memory (`--memory`): bytes a training job holds, counted as storages (peftc.inspect.memory):
the base's parameters, the adapters with their AdamW state, and the step's peak live bytes.
  together      one job: one base, K adapters, the peak of the 16-row step
  K jobs        K single-adapter jobs running side by side, each loading its own base
  one job       one single-adapter job alone (the least memory, and K times the wall time)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import alternate, llama_config, machine

import peftc
from peftc.inspect.memory import peak_live_bytes

MIB = 2**20

SPECS = {
    f"task{i}": {"adapters": [{"method": "lora", "targets": targets, "r": r, "alpha": 2 * r}]}
    for i, (targets, r) in enumerate([(["q_proj", "v_proj"], 16), (["k_proj", "o_proj"], 8),
                                      (["gate_proj", "up_proj"], 16), (["q_proj", "down_proj"], 8)])
}
ROWS_PER_ADAPTER = 4


def build():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--memory", action="store_true", help="also measure each job's bytes (see the docstring)")
    args = p.parse_args()
    batch = ROWS_PER_ADAPTER * len(SPECS)
    ids = torch.randint(0, llama_config().vocab_size, (batch, args.seq), generator=torch.Generator().manual_seed(0))
    example = {"input_ids": ids, "labels": ids}
    model = build()
    mt = peftc.train_adapters(model, SPECS, example_kwargs=example)
    own = {name: peftc.compile(model, spec, example_kwargs=example) for name, spec in SPECS.items()}
    rows = [name for name in SPECS for _ in range(ROWS_PER_ADAPTER)]
    picked = {name: [i for i, r in enumerate(rows) if r == name] for name in SPECS}
    opt_together = torch.optim.AdamW([p for p in mt.parameters() if p.requires_grad], lr=1e-4)
    opts = {name: torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-4) for name, cm in own.items()}

    def together():
        opt_together.zero_grad()
        mt(input_ids=ids, labels=ids, adapter_ids=rows).loss.backward()
        opt_together.step()

    def one_by_one():
        for name, cm in own.items():
            opts[name].zero_grad()
            cm(input_ids=ids[picked[name]], labels=ids[picked[name]]).loss.backward()
            opts[name].step()

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t = alternate({"together": together, "one by one": one_by_one}, args.repeats, clock=clock)
    print(f"machine: {machine()}; {mt}\n")
    print("| batch | together ms | one by one ms | together / one by one |")
    print("|---|---|---|---|")
    print(f"| {len(SPECS)} adapters x {ROWS_PER_ADAPTER} rows x {args.seq} tokens | {1e3 * t['together']:.1f} | "
          f"{1e3 * t['one by one']:.1f} | **{t['together'] / t['one by one']:.3f}** |")
    if args.memory:
        report_memory(model, (mt, opt_together, together),
                      {name: (cm, opts[name], step_of(cm, opts[name], ids[picked[name]])) for name, cm in own.items()})


def step_of(cm, opt, ids):
    def step():
        opt.zero_grad()
        cm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return step


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def job_bytes(base: int, module, opt, step) -> int:
    """What one training job holds: the base, its trainable parameters and their AdamW state,
    and the peak of its step's live bytes (median of 3)."""
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    trainable = tensor_bytes(p for p in module.parameters() if p.requires_grad) + tensor_bytes(state)
    return base + trainable + statistics.median(peak_live_bytes(step).peak for _ in range(3))


def report_memory(model, together, singles: dict) -> None:
    base = tensor_bytes(model.parameters())
    held = job_bytes(base, *together)
    jobs = {name: job_bytes(base, *job) for name, job in singles.items()}
    k_jobs, one_job = sum(jobs.values()), max(jobs.values())
    print(f"\nbase parameters {base / MIB:.1f} MiB")
    print("| contender | bytes held (MiB) | together / contender |")
    print("|---|---|---|")
    print(f"| together (one job, one base) | {held / MIB:.1f} | 1.000 |")
    print(f"| K = {len(jobs)} jobs side by side (K bases) | {k_jobs / MIB:.1f} | **{held / k_jobs:.3f}** |")
    print(f"| one single-adapter job (the largest) | {one_job / MIB:.1f} | {held / one_job:.3f} |")

if __name__ == "__main__":
    main()

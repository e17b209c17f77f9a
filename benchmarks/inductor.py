"""Regional compilation: peftc backend="inductor" vs HF PEFT eager and PEFT under torch.compile.

    python benchmarks/inductor.py [--repeats 5] [--layers 4]

The benchmarks/lora_llama.py configuration (LoRA r=16 on the seven projections, hidden 512,
batch 4 x 128, CPU fp32). Warm LoRA training steps (forward, backward, AdamW) of the four
contenders run in one process, alternated, medians. Cold compile time (the first training
step, compile included) is measured in a fresh process per contender, with Inductor's caches
pointed at an empty directory, so no contender reuses another's work; `--cold-repeats N` runs
N such processes per contender, alternated, and reports medians. Cold is reported two ways:
the first step alone, and set-up (`peftc.compile`, which captures the model eagerly; for PEFT
`get_peft_model` + the lazy `torch.compile` wrapper) plus the first step, which is what a user
waits for. Beside wall time it reports the CPU seconds of the whole process tree (Inductor's
compile workers and their g++ included), less sensitive to other jobs on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from common import alternate, llama_config, machine
from lora_llama import lora_spec, peft_lora

import peftc


def build(layers: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(num_hidden_layers=layers)).train()


def contender(name: str, layers: int, full=None):
    full = build(layers) if full is None else full
    if name in ("peft_eager", "peft_compiled"):
        model = peft_lora(full)
        return torch.compile(model) if name == "peft_compiled" else model
    backend = "inductor" if name == "peftc_inductor" else "torch"
    spec = lora_spec()
    return peftc.compile(copy.deepcopy(full), spec, backend=backend).train()


def step_fn(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


IDS = lambda: torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))  # noqa: E731
NAMES = ["peft_eager", "peft_compiled", "peftc_torch", "peftc_inductor"]


def cold(name: str, layers: int) -> dict:
    """Seconds of the first training step (compilation included), in a fresh process: `step` (the step
    alone), `setup_step` (set-up + step, wall) and `tree_cpu` (user + sys CPU of the whole process tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        out = subprocess.run([sys.executable, __file__, "--cold-one", name, "--layers", str(layers)], env=env,
                             check=True, capture_output=True, text=True, cwd=os.path.dirname(__file__))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["tree_cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result


def cold_one(name: str, layers: int) -> None:
    full = build(layers)  # not timed, for either contender: building the model is the user's
    import peft  # noqa: F401  imported before the clock starts (peftc is imported at the top)
    if name == BASELINE:  # the process-tree CPU every contender's process spends before its clock starts
        return print(json.dumps({"step": 0.0, "setup_step": 0.0}))
    start = time.perf_counter()
    model = contender(name, layers, full)
    step = step_fn(model, IDS())
    set_up = time.perf_counter()
    step()
    end = time.perf_counter()
    print(json.dumps({"step": end - set_up, "setup_step": end - start}))


BASELINE = "imports_and_build"


def report_cold(layers: int, repeats: int) -> None:
    names = ("peft_compiled", "peftc_inductor", BASELINE)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for _ in range(repeats):  # alternated: a change of load hits both contenders alike
        for name in names:
            samples[name].append(cold(name, layers))
            print(f"  cold sample {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in samples[name][-1].items())
                  + f" (load {os.getloadavg()[0]:.2f})")
    for key, what in (("step", "first step alone"), ("setup_step", "set-up + first step, wall"),
                      ("tree_cpu", "set-up + first step, process-tree CPU")):
        med = {name: statistics.median(s[key] for s in samples[name]) for name in names}
        if key == "tree_cpu":  # less the imports and model build both processes spend before the clock
            what += f" less {med[BASELINE]:.1f} s of imports and build"
            med = {name: med[name] - med[BASELINE] for name in names[:2]}
        print(f"cold {what} ({layers} layers, median of {repeats}): "
              + ", ".join(f"{k} {v:.1f} s" for k, v in med.items() if k != BASELINE)
              + f"; peftc/peft {med['peftc_inductor'] / med['peft_compiled']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cold-one", default=None)
    parser.add_argument("--skip-cold", action="store_true")
    parser.add_argument("--cold-repeats", type=int, default=1)
    args = parser.parse_args()
    if args.cold_one:
        return cold_one(args.cold_one, args.layers)
    print(machine())
    if not args.skip_cold:
        report_cold(args.layers, args.cold_repeats)
    ids = IDS()
    steps = {name: step_fn(contender(name, args.layers), ids) for name in NAMES}
    for clock, what in ((time.perf_counter, "wall"), (time.process_time, "process CPU")):
        print(f"load average before: {os.getloadavg()[0]:.2f}")
        times = alternate(steps, args.repeats, warmup=2, clock=clock)
        print(f"warm training step, {what} (median s): " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items()))
        print(f"peftc_inductor / peft_eager {times['peftc_inductor'] / times['peft_eager']:.3f}; "
              f"peftc_inductor / peft_compiled {times['peftc_inductor'] / times['peft_compiled']:.3f}; "
              f"peftc_torch / peft_eager {times['peftc_torch'] / times['peft_eager']:.3f}")


if __name__ == "__main__":
    main()

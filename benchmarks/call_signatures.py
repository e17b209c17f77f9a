"""The cost of a call signature the compiled model has not seen, against the compile itself (CPU).

    python benchmarks/call_signatures.py [--repeats 3]

The lora_llama.py model and spec. Each row is a first call, on a fresh compile, of a variation
of the compiled call (input_ids + attention_mask): variations that map to the same graph
(positional ids, no mask, return_dict=False, arguments equal to their defaults) and ones that
need a graph of their own (labels, output_hidden_states). Reported: the first call's time minus
the same call's time once warm (the cost of meeting the signature), medians over fresh compiles,
and how many graphs the compiled model then holds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import peftc
from common import machine
from lora_llama import ALPHA, R, TARGETS, build

IDS = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
VARIATIONS = {
    "positional ids, no mask": lambda cm: cm(IDS),
    "return_dict=False": lambda cm: cm(input_ids=IDS, return_dict=False),
    "defaults spelled out": lambda cm: cm(input_ids=IDS, attention_mask=None, labels=None, position_ids=None),
    "labels (new graph)": lambda cm: cm(input_ids=IDS, labels=IDS),
    "output_hidden_states (new graph)": lambda cm: cm(input_ids=IDS, output_hidden_states=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    full = build()
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "r": R, "alpha": ALPHA}]}
    compile_s, first_s, graphs = [], {name: [] for name in VARIATIONS}, {}
    for _ in range(args.repeats):
        for name, call in VARIATIONS.items():
            start = time.perf_counter()
            cm = peftc.compile(copy.deepcopy(full), spec).eval()
            compile_s.append(time.perf_counter() - start)
            with torch.no_grad():
                start = time.perf_counter()
                call(cm)
                first = time.perf_counter() - start
                start = time.perf_counter()
                call(cm)  # the same call again: what any call costs once its graph exists
                first_s[name].append(first - (time.perf_counter() - start))
                graphs[name] = len(cm.graphs)
    base = statistics.median(compile_s)
    print(f"compile: {base:.2f} s (median of {len(compile_s)})")
    for name, times in first_s.items():
        t = statistics.median(times)
        print(f"  first call, {name}: +{t:.2f} s over a warm call = {t / base:.1%} of compile; "
              f"graphs: {graphs[name]}")


if __name__ == "__main__":
    main()

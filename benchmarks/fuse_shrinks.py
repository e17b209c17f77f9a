"""fuse_lora_shrinks on/off: LoRA training step and eval forward on lora_llama.py's model, vs HF PEFT.

    OMP_NUM_THREADS=1 python benchmarks/fuse_shrinks.py [--repeats 15] [--tokens 128]

Same model, spec and input as lora_llama.py (LLaMA-style, hidden 512, 4 layers, LoRA r=16 on
q,k,v,o,gate,up,down, batch 4). Four contenders in one process, alternated round by round,
medians: HF PEFT, peftc (shrinks fused: the default), peftc with the fusion undone
(the same spec compiled with shrink fusion switched off), and the base model.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from unittest import mock

import torch
from common import machine
from lora_llama import R, build, forward, lora_spec, peft_lora, training_step

import peftc


def alternate_rounds(contenders: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """All times per contender, contenders run in turn (a rotating start, so none always goes first)."""
    names = list(contenders)
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def compiled_pair(full, spec):
    fused = peftc.compile(copy.deepcopy(full), spec)
    with mock.patch("peftc.compiler.plan.may_fuse", return_value=False):  # the train plan without the fusion
        plain = peftc.compile(copy.deepcopy(full), spec)
    assert not any(r.name == "fuse_lora_shrinks" for r in plain.records)
    assert any(r.name == "fuse_lora_shrinks" and r.modified for r in fused.records)
    with torch.no_grad():  # the same (zero-B) adapters: both compute the same numbers
        theirs = plain.adapter_state_dict()
        for name, tensor in fused.adapter_state_dict().items():
            theirs[name].copy_(tensor)
    return fused, plain


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a/b within each round: drift between rounds cancels."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def micro(tokens: int, hidden: int, ranks: list[int], repeats: int) -> dict[str, float]:
    """The LoRA branches of q/k/v alone: three shrinks vs one shrink on cat(A) + split (eval and fwd+bwd)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, tokens, hidden, generator=g, requires_grad=True)  # batch 4, as lora_llama.py
    a = [torch.randn(r, hidden, generator=g, requires_grad=True) for r in ranks]
    b = [torch.randn(hidden, r, generator=g, requires_grad=True) for r in ranks]
    lin = torch.ops.aten.linear.default

    def unfused():
        return [lin(lin(x, ai), bi) for ai, bi in zip(a, b)]

    def fused():
        parts = torch.ops.aten.split_with_sizes.default(lin(x, torch.cat(a)), ranks, -1)
        return [lin(p, bi) for p, bi in zip(parts, b)]

    def evaluate(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def train(fn):
        def run():
            sum(y.sum() for y in fn()).backward()
            for t in (x, *a, *b):
                t.grad = None
        return run

    times = alternate_rounds({"eval_unfused": evaluate(unfused), "eval_fused": evaluate(fused),
                              "train_unfused": train(unfused), "train_fused": train(fused)}, repeats, warmup=5)
    return {"eval": paired_ratio(times, "eval_fused", "eval_unfused"),
            "train": paired_ratio(times, "train_fused", "train_unfused"),
            **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=128, help="sequence length (batch 4)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--micro", action="store_true", help="only the q/k/v LoRA branches, several token counts")
    args = parser.parse_args()
    if args.micro:
        print(f"machine: {machine()}")
        for tokens in (1, 8, 32, 128, 512):
            r = micro(tokens, 512, [R, R, R], args.repeats)
            print(f"q/k/v LoRA branches, 4 x {tokens} tokens x 512, r {R}: fused/unfused eval {r['eval']:.3f} "
                  f"train {r['train']:.3f}  (unfused eval {1e6 * r['eval_unfused']:.0f} us, "
                  f"train {1e6 * r['train_unfused']:.0f} us)")
        return
    print(f"machine: {machine()}")
    ids = torch.randint(0, 4000, (4, args.tokens), generator=torch.Generator().manual_seed(0))
    full = build()
    spec = lora_spec()
    hf = peft_lora(full)
    fused, plain = compiled_pair(full, spec)
    sections = []
    if not args.skip_train:
        for m in (hf, fused, plain):
            m.train()
        sections.append(("train step", alternate_rounds(
            {"peft": training_step(hf, ids), "peftc": training_step(fused, ids),
             "peftc_unfused": training_step(plain, ids)}, args.repeats)))
    for m in (hf, fused, plain, full):
        m.eval()
    sections.append(("eval forward", alternate_rounds(
        {"base": forward(full, ids), "peft": forward(hf, ids), "peftc": forward(fused, ids),
         "peftc_unfused": forward(plain, ids)}, args.repeats)))
    for title, times in sections:
        medians = "  ".join(f"{k} {1e3 * statistics.median(v):.1f}" for k, v in times.items())
        print(f"{title} ms (median of {args.repeats}): {medians}")
        print(f"  peftc/peft {paired_ratio(times, 'peftc', 'peft'):.3f}   "
              f"peftc_unfused/peft {paired_ratio(times, 'peftc_unfused', 'peft'):.3f}   "
              f"fused/unfused {paired_ratio(times, 'peftc', 'peftc_unfused'):.3f}")


if __name__ == "__main__":
    main()

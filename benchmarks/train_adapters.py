"""Concurrent multi-adapter training (mLoRA): K adapters in one batch vs the same steps one after another.

    python benchmarks/train_adapters.py [--repeats 5] [--seq 32]

A LLaMA-style model (hidden 512, 4 layers, fp32) and K = 4 LoRA adapters (ranks 8 and 16, each
on different projections). One training step (forward with labels, backward, AdamW step) on a
batch of 4 adapters x 4 rows:
  together     `peftc.train_adapters(model, {...})` on all 16 rows, each row its adapter
  one by one   each adapter's own `peftc.compile` model on its 4 rows, four steps in turn
Contenders alternate round by round; medians. The issue's goal: together <= 0.6x one by one.
"""

from __future__ import annotations

import argparse

import torch
from common import alternate, llama_config, machine

import peftc

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

    t = alternate({"together": together, "one by one": one_by_one}, args.repeats)
    print(f"machine: {machine()}; {mt}\n")
    print("| batch | together ms | one by one ms | together / one by one |")
    print("|---|---|---|---|")
    print(f"| {len(SPECS)} adapters x {ROWS_PER_ADAPTER} rows x {args.seq} tokens | {1e3 * t['together']:.1f} | "
          f"{1e3 * t['one by one']:.1f} | **{t['together'] / t['one by one']:.3f}** |")


if __name__ == "__main__":
    main()

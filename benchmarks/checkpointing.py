"""Activation checkpointing: bytes saved for backward and step time, peftc vs HF PEFT (CPU, fp32).

    python benchmarks/checkpointing.py [--repeats 5]

The lora_llama.py model and spec (hidden 512, 4 layers, LoRA r=16 on the 7 projections), batch
4 x 128. Bytes are everything autograd saves for backward in one forward with labels, counted by
torch.autograd.graph.saved_tensors_hooks (each saved tensor's numel x element size, as saved).
"""

from __future__ import annotations

import argparse
import copy

import torch

import peftc
from common import alternate, machine
from lora_llama import build, lora_spec, peft_lora, training_step


def saved_bytes(model, ids) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def contenders():
    full = build()
    spec = lora_spec()
    peft_plain = peft_lora(full)
    peft_ckpt = peft_lora(full)
    peft_ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours_plain = peftc.compile(copy.deepcopy(full), spec)
    ours_ckpt = peftc.compile(copy.deepcopy(full), spec)
    ours_ckpt.gradient_checkpointing_enable()
    models = {"peft": peft_plain, "peft_ckpt": peft_ckpt, "peftc": ours_plain, "peftc_ckpt": ours_ckpt}
    for model in models.values():
        model.train()
    return models


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
    models = contenders()
    mib = {name: saved_bytes(model, ids) / 2**20 for name, model in models.items()}
    print("saved for backward (MiB): " + "  ".join(f"{k} {v:.1f}" for k, v in mib.items()))
    print(f"  peftc_ckpt/peftc {mib['peftc_ckpt'] / mib['peftc']:.3f}   "
          f"peftc_ckpt/peft_ckpt {mib['peftc_ckpt'] / mib['peft_ckpt']:.3f}")
    times = alternate({name: training_step(model, ids) for name, model in models.items()}, args.repeats)
    print("train step ms: " + "  ".join(f"{k} {1e3 * v:.1f}" for k, v in times.items()))
    print(f"  peftc_ckpt/peft_ckpt {times['peftc_ckpt'] / times['peft_ckpt']:.3f}   "
          f"peftc_ckpt/peftc {times['peftc_ckpt'] / times['peftc']:.3f}")


if __name__ == "__main__":
    main()

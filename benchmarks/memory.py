"""Peak memory of a LoRA training step, peftc vs HF PEFT, without and with gradient checkpointing (CPU, fp32).

    python benchmarks/memory.py [--repeats 3] [--hidden 512 --seq 128] [--profile]

lora_llama.py's model and spec by default (hidden 512, intermediate 1376, 4 layers, vocab 4000,
LoRA r=16 / alpha 32 on the 7 projections, batch 4 x 128, AdamW); `--hidden 256 --seq 256`
is the issue's configuration. Two figures per contender, both counted by peftc.inspect.memory
over storages (views and shared tensors once):

- saved: bytes autograd saves for backward in one forward with labels that the forward's own
  ops allocated (weights saved by reference are not activations);
- peak: the most bytes of storages alive at once during one whole step (forward, backward,
  AdamW step) that the step allocated (parameters, optimizer state and the batch excluded).

PEFT checkpoints with `gradient_checkpointing_enable(use_reentrant=False)`; peftc with
`cm.gradient_checkpointing_enable()`. Contenders alternate round by round; medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import llama_config, machine
from lora_llama import lora_spec, peft_lora, training_step

import peftc
from peftc.inspect.memory import peak_live_bytes, saved_for_backward

MIB = 2**20


def build(hidden: int, layers: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = llama_config(hidden_size=hidden, intermediate_size=hidden * 1376 // 512, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    return LlamaForCausalLM(cfg).eval()


def contenders(full) -> dict:
    spec = lora_spec()
    models = {}
    for checkpointing in (False, True):
        suffix = "_ckpt" if checkpointing else ""
        theirs = peft_lora(full)
        ours = peftc.compile(copy.deepcopy(full), spec)
        if checkpointing:
            theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            ours.gradient_checkpointing_enable()
        models["peft" + suffix], models["peftc" + suffix] = theirs, ours
    for model in models.values():
        model.train()
    return models


def measure(model, ids) -> tuple:
    """(saved, peak) of one training step; the optimizer's state exists already (one step ran)."""
    step = training_step(model, ids)
    step()  # AdamW state, and the graph for this call signature, before measuring
    saved = saved_for_backward(lambda: model(input_ids=ids, labels=ids).loss)
    model.zero_grad(set_to_none=True)
    return saved, peak_live_bytes(step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--profile", action="store_true", help="what is saved / alive at the peak, by op")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"hidden {args.hidden}, {args.layers} layers, batch {args.batch} x {args.seq}")
    ids = torch.randint(0, 4000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    models = contenders(build(args.hidden, args.layers))
    saved = {name: [] for name in models}
    peak = {name: [] for name in models}
    last = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            s, p = measure(model, ids)
            saved[name].append(s.total / MIB)
            peak[name].append(p.peak / MIB)
            last[name] = (s, p)
    saved = {k: statistics.median(v) for k, v in saved.items()}
    peak = {k: statistics.median(v) for k, v in peak.items()}
    for name in models:
        print(f"{name:11s} saved {saved[name]:8.2f} MiB   peak {peak[name]:8.2f} MiB")
    for suffix in ("", "_ckpt"):
        print(f"peftc{suffix}/peft{suffix}: saved {saved['peftc' + suffix] / saved['peft' + suffix]:.3f}   "
              f"peak {peak['peftc' + suffix] / peak['peft' + suffix]:.3f}")
    if args.profile:
        for name, (s, p) in last.items():
            print(f"-- {name}: saved by the op that made it (MiB): "
                  + ", ".join(f"{op} {b / MIB:.2f}" for op, b in s.top(12)))
            print("   alive at the peak (MiB): " + ", ".join(f"{op} {b / MIB:.2f}" for op, b in p.top(12)))


if __name__ == "__main__":
    main()

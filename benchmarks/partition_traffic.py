"""DLoRA partition traffic (peftc.partition): bytes between the base program and the user program.

    python benchmarks/partition_traffic.py [--repeats 3]

The benchmark LLaMA config (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 4000; as
lora_llama.py), LoRA r=16 alpha=32 on q,v and on all seven projections. Per training step
(batch 4 x 128 tokens, forward + backward) and per generated token (KV cache on the base,
batch 1): what the programs' link measured — every header and payload, per direction — beside
the lower bound, the crossing tensors' bytes alone, and the call's own inputs and outputs
(token ids in, logits out). The in-process link counts exactly what the torch.distributed link
sends (tests/frontend/test_partition_distributed.py checks it). Also: step time of the
partition in one process against the compiled model, alternated, medians; and the traffic
with Kill-and-Revive having switched off every v_proj site.
"""

from __future__ import annotations

import argparse

import torch
from common import alternate, llama_config, machine

import peftc
from peftc.partitioning.kill_revive import KillRevive

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32


def build():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config()).eval()


def step(model, ids, params):
    optimizer = torch.optim.SGD(params, lr=1e-4)

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def measure(targets: list[str], repeats: int) -> dict:
    cm = peftc.compile(build(), {"adapters": [{"method": "lora", "targets": targets, "r": R, "alpha": ALPHA}]})
    kill_revive = KillRevive(threshold=0.0)
    part = peftc.partition(cm, kill_revive=kill_revive)
    cm.train(), part.train()
    ids = torch.randint(0, 4000, (4, 128), generator=torch.Generator().manual_seed(0))
    params = list(cm.adapter_root.parameters())
    step(part, ids, params)()
    train = part.traffic().to_dict()
    kill_revive.dead_sites = frozenset(s for s in kill_revive.watched if s.endswith("v_proj"))
    step(part, ids, params)()
    killed_v = part.traffic().to_dict()
    kill_revive.dead_sites = frozenset()
    times = alternate({"compiled": step(cm, ids, params), "partition": step(part, ids, params)}, repeats, warmup=1)
    cm.eval(), part.eval()
    prompt = torch.randint(0, 4000, (1, 16), generator=torch.Generator().manual_seed(1))
    tokens = part.generate(prompt, max_new_tokens=8)
    same_tokens = torch.equal(tokens, cm.generate(prompt, max_new_tokens=8))
    decode = [t.to_dict() for t in part.generation_traffic()[1:]]
    report = part.report()
    return {"train": train, "killed_v": killed_v, "times": times, "decode": decode[len(decode) // 2],
            "same_tokens": same_tokens, "exchanges": report.totals["exchanges"], "per_token": report.totals}


def table(name: str, r: dict) -> list[str]:
    t, d, k = r["train"], r["decode"], r["killed_v"]
    tokens = 4 * 128

    def row(label, traffic):
        act, low, io = traffic["activations"], traffic["lower_bound"], traffic["call_io"]
        return (f"| {name} | {label} | {mb(traffic['to_user'])} / {mb(traffic['to_base'])} | "
                f"{mb(act['to_user'])} / {mb(act['to_base'])} | {mb(low['to_user'])} / {mb(low['to_base'])} | "
                f"{mb(io['to_user'])} / {mb(io['to_base'])} | {traffic['messages']} |")

    lines = [row("training step (512 tokens)", t), row("training step, v_proj sites killed", k)]
    act, low = d["activations"], d["lower_bound"]
    lines.append(f"| {name} | per generated token | {d['to_user']:,} B / {d['to_base']:,} B | "
                 f"{act['to_user']:,} B / {act['to_base']:,} B | {low['to_user']:,} B / {low['to_base']:,} B | "
                 f"{d['call_io']['to_user']:,} B / {d['call_io']['to_base']:,} B | {d['messages']} |")
    per = sum(t["lower_bound"].values()) / tokens
    lines.append(f"| {name} | lower bound per training token | {per / 1e3:.1f} kB | | | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}\n")
    results = {"q,v": measure(["q_proj", "v_proj"], args.repeats), "all seven": measure(SEVEN, args.repeats)}
    print("| LoRA on | what | measured MB to user / to base | activations | lower bound (cut tensors) | "
          "call inputs / outputs | messages |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print("\n".join(table(name, r)))
    print()
    print("| LoRA on | exchanges per step | step ms: compiled / partition (one process) | ratio | "
          "generated tokens equal cm.generate |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        c, p = r["times"]["compiled"] * 1e3, r["times"]["partition"] * 1e3
        print(f"| {name} | {r['exchanges']} | {c:.0f} / {p:.0f} | {p / c:.3f} | {r['same_tokens']} |")


if __name__ == "__main__":
    main()

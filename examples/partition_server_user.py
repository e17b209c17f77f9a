"""A frozen base model served by one process, users with their own LoRA adapters in others (DLoRA).

    torchrun --nproc-per-node 3 examples/partition_server_user.py    # rank 0 serves the base; ranks 1, 2 train
    python examples/partition_server_user.py --spawn 2                # the same, started by peftc's launcher

Rank 0 holds the base weights only and serves every user (`peftc.serve_base`). Each user
compiles its own spec, keeps its adapters, data and optimizer, and calls the base through
`peftc.connect`: only activations and their gradients cross (gloo on 127.0.0.1). User 1 trains
LoRA on q,v; user 2 LoRA on all seven projections. Each prints its losses and the bytes its
steps exchanged, measured at the link. (The users build the same small LLaMA to compile their
graphs; its base weights never leave their process and are never used there.)
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import peftc
from peftc.partitioning.launch import run_ranks

SPECS = {1: ["q_proj", "v_proj"], 2: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=64)).eval()


def server(rank: int) -> None:
    stats = peftc.serve_base(build_model())
    print(f"[base] weights holding a gradient: {stats.pop('weight_gradients')}")
    for user, s in stats.items():
        print(f"[base] user {user}: {s['calls']} calls, {s['to_user'] / 1e3:.1f} kB sent, "
              f"{s['to_base'] / 1e3:.1f} kB received")


def user(rank: int, steps: int = 20) -> None:
    targets = SPECS[1 + (rank - 1) % 2]
    cm = peftc.compile(build_model(), {"adapters": [{"method": "lora", "targets": targets, "r": 8, "alpha": 16}]})
    part = peftc.connect(cm, base_rank=0)
    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=3e-3)
    # the task: continue a counting sequence (token t+1 after t), shifted per user
    ids = (torch.arange(16)[None, :] + torch.arange(8)[:, None] + rank) % 64
    cm.train()
    for step in range(steps):
        loss = part(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, steps - 1):
            print(f"[user {rank}] LoRA on {','.join(t[:-5] for t in targets)}: step {step} loss {loss.item():.3f}; "
                  f"{part.traffic()}")
    part.close()
    cm.save_adapter(f"out/partition_user{rank}")  # the adapters trained over the wire, as any compiled model's


def main(rank: int) -> None:
    (server if rank == 0 else user)(rank)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--spawn", type=int, metavar="USERS", help="start the base and USERS users here")
    args = parser.parse_args()
    if args.spawn:
        run_ranks([main] * (args.spawn + 1), timeout_s=600)
    else:  # under torchrun: the rendezvous comes from the environment
        dist.init_process_group("gloo")
        try:
            main(int(os.environ["RANK"]))
        finally:
            dist.destroy_process_group()

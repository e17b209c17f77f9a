"""Train LoRA on a peftc-compiled model sharded with FSDP2, one process per device, launched by torchrun.

    torchrun --nproc-per-node 2 examples/train_fsdp2.py [--steps 30] [--checkpointing] [--out out/fsdp2]

The recipe torchtune and accelerate users know: compile, then `fully_shard` each decoder layer
(the compiled layers sit at the original module paths, `cm.model.layers[i]`), then the root.
Each rank keeps 1/world of every base weight and adapter and all-gathers one layer at a time
in forward and backward. `--checkpointing` recomputes each layer in backward (peftc's
activation checkpointing, per compiled layer, so it composes with the sharding).

The model is a small LLaMA built from a config (nothing downloaded), the same on every rank
(same seed); each rank trains on its own rows of every batch (the task: continue a count,
d, d+1, d+2, ... mod 10). Gloo on CPU, NCCL when every rank has a GPU. Rank 0 prints the
losses, what each rank holds, and saves the adapter (every rank gathers its shards for it).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

import peftc

LENGTH, GLOBAL_BATCH = 12, 8


def count_batch(step: int, rank: int, world_size: int, device: torch.device) -> torch.Tensor:
    """This rank's rows of the step's global batch: every rank draws the same batch and keeps its slice."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, 10, (GLOBAL_BATCH, 1), generator=g)
    ids = (starts + torch.arange(LENGTH)) % 10
    per_rank = GLOBAL_BATCH // world_size
    return ids[rank * per_rank:(rank + 1) * per_rank].to(device)


def shard(cm: peftc.CompiledModel) -> None:
    """FSDP2 per layer, then the root (the embeddings, final norm, head and whatever no layer holds)."""
    for layer in cm.model.layers:
        fully_shard(layer)
    fully_shard(cm)


def held_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole parameters)."""
    local = whole = 0
    for p in module.parameters():
        shard_of = p.to_local() if isinstance(p, DTensor) else p
        local += shard_of.numel() * shard_of.element_size()
        whole += p.numel() * p.element_size()
    return local, whole


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--out", default="out/fsdp2")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["LOCAL_WORLD_SIZE"])
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same base weights on every rank
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=10, max_position_embeddings=32)
    model = LlamaForCausalLM(config).to(device)
    spec = {"adapters": [{"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "r": 8, "alpha": 16}]}
    cm = peftc.compile(model, spec)  # the same adapter initialization on every rank: same seed, same order
    if args.checkpointing:
        cm.gradient_checkpointing_enable()
    shard(cm)
    local, whole = held_bytes(cm)

    optimizer = torch.optim.AdamW([p for p in cm.parameters() if p.requires_grad], lr=1e-2)
    cm.train()
    losses = []
    for step in range(args.steps):
        ids = count_batch(step, rank, world_size, device)
        loss = cm(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss))
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)

    saved = cm.save_adapter(args.out)  # a collective: every rank gathers its shards, rank 0 writes
    if rank == 0:
        print(f"{world_size} ranks, {'CUDA' if use_cuda else 'CPU'}, checkpointing "
              f"{'on' if cm.is_gradient_checkpointing else 'off'}: each rank holds {local:,} of {whole:,} "
              f"parameter bytes ({local / whole:.1%}); loss {losses[0]:.3f} -> {losses[-1]:.3f}; adapter saved to {saved}/")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

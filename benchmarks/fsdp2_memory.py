"""What FSDP2 per layer leaves on each rank: peftc's compiled model vs HF PEFT, side by side.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 benchmarks/fsdp2_memory.py [--layers 4] [--hidden 256] [--quantized]

Each rank builds the same LLaMA, wraps it (peftc.compile, or get_peft_model), deletes its own
reference to the model, shards each decoder layer then the root, trains one step, and counts
bytes: the parameter shards FSDP2 holds, and every tensor storage still alive that the wrapped
model reaches (peftc.inspect.reachable: its graphs, its compilation and the source later call
signatures are captured from, hooks and FSDP2's state included). Bytes, not time: nothing here
depends on the machine's load.
"""

from __future__ import annotations

import argparse
import functools
import gc

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

import peftc
from peftc.inspect.reachable import reachable_storage_bytes

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def storages(tensors) -> dict[int, int]:
    """data pointer -> bytes of each distinct storage under `tensors` (a DTensor counts its local shard)."""
    out = {}
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        out[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return out


def one_step(model, rank: int, world_size: int) -> None:
    ids = torch.randint(0, 128, (2 * world_size, 32), generator=torch.Generator().manual_seed(0))
    ids = ids[2 * rank:2 * rank + 2]
    model(input_ids=ids, labels=ids).loss.backward()


def peftc_side(base, quantize: dict | None = None) -> tuple[torch.nn.Module, list]:
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "r": 8, "alpha": 16}], "quantize": quantize}
    cm = peftc.compile(base, spec).train()
    return cm, list(cm.model.layers)


QUANTIZED = {"peftc, int8 base": {"bits": 8}, "peftc, nf4 base": {"bits": 4, "format": "nf4", "group_size": 64}}


def peft_side(base) -> tuple[torch.nn.Module, list]:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).train()
    return model, list(model.base_model.model.model.layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--quantized", action="store_true", help="also peftc with an int8 and an nf4 base")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    rows = []
    sides = [("HF PEFT", peft_side), ("peftc", peftc_side)]
    sides += [(name, functools.partial(peftc_side, quantize=q)) for name, q in QUANTIZED.items()] if args.quantized else []
    for name, side in sides:
        torch.manual_seed(0)
        base = LlamaForCausalLM(config)
        whole = sum(p.numel() * p.element_size() for p in base.parameters())
        model, layers = side(base)
        del base  # the user lets go of the model they wrapped
        gc.collect()
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        del layers
        one_step(model, rank, world_size)
        shards = storages(p for p in model.parameters())
        rows.append((name, whole, sum(shards.values()), reachable_storage_bytes(model)))
        del model
        gc.collect()
    if rank == 0:
        print(f"{world_size} ranks, LLaMA hidden {args.hidden}, {args.layers} layers, LoRA r=8 on all projections; "
              "bytes on rank 0")
        print("| wrapper | whole model | FSDP2 shards held | storage reachable from the model | reachable / whole |")
        print("|---|---|---|---|---|")
        for name, whole, shards, alive in rows:
            print(f"| {name} | {whole:,} | {shards:,} | {alive:,} | {alive / whole:.3f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

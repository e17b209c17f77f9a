"""LoRA training of a compiled LLaMA, on one process or as one rank of several (DDP, FSDP2).

The distributed tests run `train` on each rank with that rank's rows of every batch and
compare with `train` on one process with the whole batch: the per-step losses (the mean of the
ranks' losses, as the full batch's mean over equally many tokens) and the adapters after each
step. Dropout is off, so both runs compute the same function.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import peftc
from families import FAMILIES, randomize_adapters

BATCH, SEQ, LR = 4, 16, 1e-2
STEPS = int(os.environ.get("PEFTC_DISTRIBUTED_STEPS", "3"))  # a few by default; more for a longer local check
LORA = {"method": "lora", "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "r": 4, "alpha": 8, "dropout": 0.0}


def compiled_llama(quantize: dict | None = None) -> peftc.CompiledModel:
    """The same compiled model with the same non-zero adapters on every process, captured for training calls."""
    spec = {"adapters": [LORA]} | ({"quantize": quantize} if quantize else {})
    ids = batch(0)[:2]
    cm = peftc.compile(FAMILIES["llama"].build(), spec, example_kwargs={"input_ids": ids, "labels": ids})
    randomize_adapters(cm, seed=1)
    return cm.train()


@functools.cache
def single_process_run() -> tuple[peftc.CompiledModel, dict]:
    """compiled_llama trained `STEPS` steps on the whole batch in this process, and its `train` result: what
    the DDP and FSDP2 runs are compared with. Made once per test process; the tests only read it."""
    cm = compiled_llama()
    return cm, train(cm, steps=STEPS)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def rows(ids: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    per_rank = ids.shape[0] // world_size
    return ids[rank * per_rank:(rank + 1) * per_rank]


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter as one plain tensor: FSDP2's DTensor shards gathered, others as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def trained_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by name, wrapper prefixes (DDP's `module.`) removed, gathered whole."""
    return {name.removeprefix("module."): full(p.detach()).clone()
            for name, p in module.named_parameters() if p.requires_grad}


def train(model: torch.nn.Module, rank: int = 0, world_size: int = 1, steps: int = STEPS) -> dict:
    """`steps` AdamW steps on this rank's rows; the mean loss of all ranks and the adapters after each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, adapters = [], []
    for step in range(steps):
        ids = rows(batch(step), rank, world_size)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss.detach()).item())
        adapters.append(trained_tensors(model))
    return {"losses": losses, "adapters": adapters}


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def assert_matches_single_process(results: list[dict], reference: dict, atol: float = 1e-5) -> None:
    """Each rank's losses and adapters after every step equal the one-process run on the whole batch."""
    for rank, result in enumerate(results):
        assert len(result["losses"]) == len(reference["losses"])
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]),
                                   rtol=0, atol=atol, msg=lambda m, rank=rank: f"rank {rank} losses: {m}")
        for step, (ours, theirs) in enumerate(zip(result["adapters"], reference["adapters"])):
            assert ours.keys() == theirs.keys() and ours
            for name in theirs:
                torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=atol,
                                           msg=lambda m, where=f"rank {rank}, step {step}, {name}": f"{where}: {m}")
    assert reference["losses"][-1] < reference["losses"][0]  # it trained: the adapters moved the loss


def assert_identical_across_ranks(results: list[dict]) -> None:
    """After every step, every rank holds bit-identical adapters."""
    first = results[0]["adapters"]
    for rank, result in enumerate(results[1:], start=1):
        for step, (ours, theirs) in enumerate(zip(result["adapters"], first)):
            for name in theirs:
                assert torch.equal(ours[name], theirs[name]), f"rank {rank} differs from rank 0 at step {step}: {name}"



def shard_shapes(module: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.Size]]:
    """Every parameter FSDP2 sharded: (the shape this rank holds, the whole parameter's shape)."""
    return {name: (p.to_local().shape, p.shape) for name, p in module.named_parameters() if isinstance(p, DTensor)}


def assert_dim0_chunk(shapes: dict[str, tuple[torch.Size, torch.Size]], rank: int, world_size: int) -> None:
    """Each rank holds its torch.chunk of dim 0 (ceil(rows / world) rows, fewer on the last) of each parameter."""
    for name, (local, whole) in shapes.items():
        per_rank = -(-whole[0] // world_size)
        rows = max(0, min(per_rank, whole[0] - rank * per_rank))
        assert tuple(local) == (rows, *whole[1:]), f"{name}: rank {rank} holds {tuple(local)} of {tuple(whole)}"

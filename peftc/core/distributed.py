"""Adapter files under FSDP2 and DDP: sharded tensors gathered whole to save, scattered back on load.

FSDP2 (`fully_shard`) turns each parameter into a DTensor whose rank-local part is a shard.
A checkpoint holds whole tensors, as on one process. When anything is sharded every rank calls
save and load (both are collectives then): save gathers each shard and only rank 0 writes;
load reads the whole tensor on every rank and keeps this rank's shard of it. Without shards
(one process, DDP) nothing changes: whoever calls save writes, as DDP's `if rank == 0:` expects.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


def any_sharded(tensors) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor's shards all-gathered (a collective), anything else as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def placed_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `target`: this rank's shard where `target` is a DTensor."""
    if not isinstance(target, DTensor):
        return value
    return distribute_tensor(value.to(target.device), target.device_mesh, target.placements)


def writes_files(sharded: bool) -> bool:
    """Whether this process writes the checkpoint: any caller when nothing is sharded, else rank 0 alone."""
    return not sharded or not dist.is_initialized() or dist.get_rank() == 0


def wait_for_writer(sharded: bool) -> None:
    """When sharded (every rank saving together), no rank goes on before rank 0 has finished writing."""
    if sharded and dist.is_initialized():
        dist.barrier()

"""Capturing a model whose parameters FSDP2 sharded: shapes from whole-looking stand-ins, tensors bound back.

Under `fully_shard` the capture source reads the compiled model's tree (runtime.module_tree.
share_parameters), where each sharded parameter is a DTensor holding this rank's rows. torch.export
traces shapes, not values, but a DTensor would trace as a distributed tensor. So the model is
captured from a structural copy whose sharded parameters are zero-storage stand-ins of the whole
shape (one element, expanded), and the captured graph's stand-ins are then replaced by the very
DTensors they stood for: the graph names the tree's tensors, and runs them inside FSDP2's hooks.
Nothing is gathered: no rank ever holds a whole weight for a capture.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from peftc.core.distributed import any_sharded


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor. A DTensor lives on a DeviceMesh, which needs the default
    process group: in a process that has none, nothing can be sharded and no parameter is looked at (cached
    calls ask on every call; the walk costs ~10 us a parameter)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    return any_sharded(model.parameters())


def without_shards(model: nn.Module) -> tuple[nn.Module, dict[int, nn.Parameter]]:
    """A copy of `model` sharing every tensor but its DTensors, which become whole-shaped stand-ins;
    and each stand-in's id -> the DTensor it stands for (for `bind_shards`)."""
    tensors = list(model.parameters()) + list(model.buffers())
    memo: dict[int, torch.Tensor] = {id(t): t for t in tensors}
    real: dict[int, nn.Parameter] = {}
    for param in tensors:
        if isinstance(param, DTensor):
            local = param.to_local()
            stand_in = nn.Parameter(torch.zeros((), dtype=param.dtype, device=local.device).expand(param.shape),
                                    requires_grad=param.requires_grad)
            memo[id(param)] = stand_in
            real[id(stand_in)] = param
    return copy.deepcopy(model, memo), real


def runnable(model: nn.Module) -> nn.Module:
    """`model` to run eagerly outside FSDP2's hooks (reproducing a call's error): sharded, its stand-in copy,
    which has every shape right (the error a call meets is about its inputs' shapes and types)."""
    return without_shards(model)[0] if is_sharded(model) else model


def bind_shards(gm: nn.Module, real: dict[int, nn.Parameter]) -> None:
    """Replace every stand-in `without_shards` made, wherever `gm`'s modules hold one, by its DTensor."""
    for module in gm.modules():
        for name, tensor in module._parameters.items():
            if tensor is not None and id(tensor) in real:
                module._parameters[name] = real[id(tensor)]

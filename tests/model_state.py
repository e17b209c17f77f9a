"""Everything about a user's model that compiling, loading or a failed call must leave as it was."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks")


@dataclass
class ModelState:
    tensors: dict  # name -> a clone of every parameter and buffer (values, dtype, device)
    flags: dict  # parameter name -> requires_grad
    modes: dict  # module path -> training
    identity: dict  # parameter / buffer name -> id() of the object
    hooks: dict  # module path -> number of hooks of each kind

    @classmethod
    def of(cls, model: nn.Module) -> "ModelState":
        named = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
        return cls(tensors={n: t.detach().clone() for n, t in named.items()},
                   flags={n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
                   modes={path: m.training for path, m in model.named_modules()},
                   identity={n: id(t) for n, t in named.items()},
                   hooks={path: tuple(len(getattr(m, h)) for h in HOOKS) for path, m in model.named_modules()})

    def assert_same(self, model: nn.Module) -> None:
        """Bit-identical: every tensor's bits and dtype, flags, every submodule's mode, identities, hooks."""
        now = ModelState.of(model)
        assert now.tensors.keys() == self.tensors.keys()
        for name, before in self.tensors.items():
            after = now.tensors[name]
            assert after.dtype == before.dtype and after.shape == before.shape, name
            assert torch.equal(after.view(torch.uint8) if after.numel() and after.dim() else after,
                               before.view(torch.uint8) if before.numel() and before.dim() else before), name
        assert now.flags == self.flags
        assert now.modes == self.modes
        assert now.identity == self.identity
        assert now.hooks == self.hooks


def mixed_modes(model: nn.Module) -> nn.Module:
    """The model in eval, with every other submodule in train: a mode layout compile must keep."""
    model.eval()
    for i, module in enumerate(model.modules()):
        if i % 2:
            module.training = True
    return model

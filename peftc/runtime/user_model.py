"""The user's model is never changed by compiling: a weight view to capture from, and a guard.

`weight_view(model)` is a structural copy of the model — every module shallow-copied, with its
own parameter, buffer, submodule and hook dicts — whose parameters are new `nn.Parameter`
objects over the same storage (same data, same memory, no copy). Capture, freezing and mode
switches act on the view: torch.export's train() call flips the view's modules, freeze_params
sets the view's requires_grad flags, and the user's parameters keep theirs. Training still
writes the shared storage of base parameters the spec unfreezes (`trainable`), as HF PEFT
does; gradients land on the view's parameters, never on the user's `.grad`.

`kept_unchanged(model)` records every submodule's training flag and every parameter's
requires_grad flag, and puts them back when the block ends, however it ends: a second line of
defence for code paths that touch the user's model directly.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from peftc.capture.binding import VIEW_OF

HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
              "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
              "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")



def weight_view(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree whose parameters share the user's storage but not their flags."""
    modules: dict[int, nn.Module] = {}
    params: dict[int, nn.Parameter] = {}  # tied weights stay tied: one view per user parameter

    def view_param(param: nn.Parameter | None) -> nn.Parameter | None:
        if param is None or type(param) is not nn.Parameter:  # a tensor subclass: shared as it is
            return param
        if id(param) not in params:
            params[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
        return params[id(param)]

    def view_module(module: nn.Module | None) -> nn.Module | None:
        if module is None:
            return None
        if id(module) not in modules:
            clone = copy.copy(module)
            modules[id(module)] = clone
            clone._parameters = {name: view_param(p) for name, p in module._parameters.items()}
            clone._buffers = dict(module._buffers)
            for name in HOOK_DICTS:
                if name in module.__dict__:
                    setattr(clone, name, copy.copy(module.__dict__[name]))
            clone._modules = {name: view_module(child) for name, child in module._modules.items()}
            if hasattr(clone, "_init_flat_weights"):  # nn.RNN keeps a list of its parameter objects
                clone._init_flat_weights()
        return modules[id(module)]

    view = view_module(model)
    object.__setattr__(view, VIEW_OF, id(model))  # a plain attribute: not a submodule, not state
    return view


def frozen_view(model: nn.Module) -> nn.Module:
    """`weight_view(model)` with every parameter frozen: a base only adapters train on."""
    view = weight_view(model)
    for param in view.parameters():
        param.requires_grad_(False)
    return view


def shares_storage(view: nn.Module, model: nn.Module) -> bool:
    """Whether every parameter of `view` lies in the same memory as `model`'s parameter of that name."""
    own = dict(model.named_parameters(remove_duplicate=False))
    return all(name in own and p.data_ptr() == own[name].data_ptr()
               for name, p in view.named_parameters(remove_duplicate=False))


@dataclass(frozen=True)
class UserModelState:
    """What compiling must not change and can put back: modes and requires_grad flags."""

    modes: tuple[tuple[nn.Module, bool], ...]
    flags: tuple[tuple[torch.Tensor, bool], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "UserModelState":
        return cls(modes=tuple((m, m.training) for m in model.modules()),
                   flags=tuple((p, p.requires_grad) for p in model.parameters()))

    def restore(self) -> None:
        for module, training in self.modes:
            module.training = training  # not .train(): that would recurse into children
        for param, flag in self.flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


@contextlib.contextmanager
def kept_unchanged(model: nn.Module) -> Iterator[None]:
    """Put back every submodule's mode and every parameter's requires_grad flag when the block ends."""
    state = UserModelState.of(model)
    try:
        yield
    finally:
        state.restore()

"""What makes a compiled model pass for the original one: its attributes, its signature, its checkpoints.

- Attributes the compiled module does not have itself (`config`, `generation_config`,
  `get_input_embeddings`, `loss_type`, `main_input_name`, ...) are read
  from the user's model; those that run the network (`get_text_features`, ...) run through
  compiled graphs with the adapters, and so do calls of `cm.base_model` (peftc.runtime.model_methods).
  Private names (`_x`) are never forwarded: nn.Module, copy and pickle
  probe those on half-built objects, and a forward there would recurse or lie.
- `forward` carries the original's signature, so Trainer keeps the dataset columns the model
  takes and decides `model_accepts_loss_kwargs` as it would for the original.
- `state_dict()` / `load_state_dict()` hold what the spec trains (adapter_state_dict), as
  a PEFT model's checkpoints do: a Trainer checkpoint of a compiled model is the adapter only,
  and resuming loads it back. `save_pretrained(dir)` writes the adapter (runtime.peft_surface).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from peftc.runtime.call_contract import signed_forward
from peftc.runtime.model_methods import COMPILED_METHODS, COMPILED_SUBMODULES, CompiledSubmodule, compiled_method
from peftc.runtime.signed_class import signed_class


class ModelAttributes:
    """Mixin for modules that stand for the user's model, `compilation.source` (GraphDispatch)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = _user_model(self)
            if name.startswith("_") or model is None or not hasattr(model, name):
                raise
            if name in COMPILED_METHODS:  # it runs the network: run it with the adapters
                return compiled_method(self, name)
            value = getattr(model, name)
            if name in COMPILED_SUBMODULES and isinstance(value, nn.Module):
                return self if value is model else CompiledSubmodule(self, name)
            return value

    def __dir__(self):
        model = _user_model(self)
        extra = [n for n in dir(model) if not n.startswith("_")] if model is not None else []
        return sorted(set(super().__dir__()) | set(extra))

    def sign_forward(self) -> None:
        """Give `self.forward` the original's signature (an instance attribute, so each model has its own),
        and `type(self).forward` too (runtime.signed_class: Trainer reads label names from the class)."""
        model = _user_model(self)
        self.__class__ = signed_class(type(self), type(model))
        self.__dict__["forward"] = signed_forward(self, model)

    @property
    def device(self):
        return next(iter(self.graph_module.parameters())).device

    @property
    def dtype(self):
        floats = [p.dtype for p in self.graph_module.parameters() if p.is_floating_point()]
        return floats[0] if floats else None



class AdapterCheckpoint:
    """Mixin for CompiledModel: its state is what the spec trains, as Trainer saves and resumes it."""

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        tensors = self.adapter_state_dict()
        out = destination if destination is not None else {}
        for name, tensor in tensors.items():
            out[prefix + name] = tensor if keep_vars else tensor.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = self.adapter_state_dict()
        unexpected = [k for k in state_dict if k not in own]
        missing = [k for k in own if k not in state_dict]
        if strict and (unexpected or missing):
            raise RuntimeError(f"load_state_dict: the compiled model's state is its adapter; missing "
                               f"{missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state_dict.items():
                if name in own:
                    own[name].copy_(value)
        return _IncompatibleKeys(missing, unexpected)


def _user_model(module):
    """The model a dispatch stands for; None while copy or pickle rebuilds the module."""
    compilation = module.__dict__.get("compilation")
    return compilation.source if compilation is not None else None

"""Undo what a forward leaves on a transformers model: used around captures and the checks that call it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """What a forward with labels or output_hidden_states leaves on a transformers model, undone after
    a capture the user did not ask for: classification heads set `config.problem_type` on their first
    call with labels; output capturing installs forward hooks (local functions pickle cannot store);
    export's train() and train(was_training) on a keyword view of the model (capture.binding.NamedKeywords,
    a new module, so was_training is True) leave every submodule in train mode: each module's own mode
    comes back."""
    config = getattr(model, "config", None)
    problem_type = getattr(config, "problem_type", None)
    hooks = {module: (set(module._forward_hooks), set(module._forward_pre_hooks), dict(module.__dict__))
             for module in model.modules()}
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        if config is not None and hasattr(config, "problem_type"):
            config.problem_type = problem_type
        for module, training in modes:
            module.training = training  # not .train(): that would recurse into the children
        for module, (post, pre, attributes) in hooks.items():
            for key in set(module._forward_hooks) - post:
                del module._forward_hooks[key]
            for key in set(module._forward_pre_hooks) - pre:
                del module._forward_pre_hooks[key]
            for name in set(module.__dict__) - set(attributes):  # transformers' "hooks installed" marks
                del module.__dict__[name]

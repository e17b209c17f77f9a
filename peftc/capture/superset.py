"""The superset call: the example call plus the optional inputs a derived graph can drop.

peftc captures a transformers model once with `labels` (of the shape its head takes) and
`num_items_in_batch` (what Trainer passes to a forward with `**kwargs`), and derives the graph
of every call that passes fewer of them by graph surgery (peftc.capture.specialize) instead of
capturing again: the call a user makes first, Trainer's training call, a call with labels alone.

`output_hidden_states=True` is not added, though a derived graph can drop it (pass it in
`example_kwargs` to get that): a graph returning every layer's output cannot be captured as two
layers and copied (peftc.capture.layer_stacks), so it would make every compile export each layer.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.capture.binding import forward_signature
from peftc.capture.calls import is_hf_model

# class-name endings -> what the head's labels are: one per token, or one per example
TOKEN_LABELS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM")
TOKEN_CLASS_LABELS = ("ForTokenClassification",)
EXAMPLE_CLASS_LABELS = ("ForSequenceClassification", "ForImageClassification")


def superset_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """(args, kwargs) with the droppable optional inputs added, or None when there is none to add."""
    if args or not is_hf_model(model):
        return None
    extra = superset_extras(model, kwargs)
    return ((), {**kwargs, **extra}) if extra else None


def superset_extras(model: nn.Module, kwargs: dict) -> dict:
    """The inputs the superset call adds to `kwargs`, shaped after this call's main input."""
    return ExtraInputs.of(model)(kwargs)


@dataclass(frozen=True)
class ExtraInputs:
    """`superset_extras` for one model, holding only what it reads: not the model (nor its weights).

    A derived graph's guards keep this to make stand-ins for the inputs a call leaves out; holding the
    model there would keep every weight it references alive for as long as the graph lives.
    """

    params: Mapping[str, inspect.Parameter]  # the model's forward parameters
    class_name: str
    config: Any  # read when called: a classification head's problem_type can change
    main_input_name: str | None

    @classmethod
    def of(cls, model: nn.Module) -> ExtraInputs:
        return cls(forward_signature(model).parameters, type(model).__name__, getattr(model, "config", None),
                   getattr(model, "main_input_name", None))

    def __call__(self, kwargs: dict) -> dict:
        extra: dict = {}
        labels = kwargs.get("labels")
        if labels is None and "labels" in self.params:
            labels = extra["labels"] = self.example_labels(kwargs)
        if isinstance(labels, torch.Tensor) and _takes_any_keyword(self.params) and "num_items_in_batch" not in kwargs:
            extra["num_items_in_batch"] = torch.tensor(labels.numel(), device=labels.device)
        return {name: value for name, value in extra.items() if value is not None}

    def example_labels(self, kwargs: dict) -> torch.Tensor | None:
        """Labels of the shape and range the model's head takes (None for heads peftc does not know)."""
        name, config = self.class_name, self.config
        main = kwargs.get(self.main_input_name)
        if not isinstance(main, torch.Tensor) or main.dim() == 0:
            return None
        batch = main.shape[0]
        generator = torch.Generator().manual_seed(0)
        if name.endswith(TOKEN_LABELS) and main.dim() == 2 and not main.is_floating_point():
            return main.clone()
        num_labels = getattr(config, "num_labels", 0)
        single_label = getattr(config, "problem_type", None) in (None, "single_label_classification")
        if not single_label or num_labels < 2:  # regression and multi-label heads take float labels of their own shape
            return None
        if name.endswith(TOKEN_CLASS_LABELS) and main.dim() == 2:
            return torch.randint(0, num_labels, tuple(main.shape), generator=generator).to(main.device)
        if name.endswith(EXAMPLE_CLASS_LABELS):
            return torch.randint(0, num_labels, (batch,), generator=generator).to(main.device)
        return None


@contextlib.contextmanager
def model_kept(model: nn.Module) -> Iterator[None]:
    """What a forward with labels or output_hidden_states leaves on a transformers model, undone after
    a capture the user did not ask for: classification heads set `config.problem_type` on their first
    call with labels; output capturing installs forward hooks (local functions pickle cannot store)."""
    config = getattr(model, "config", None)
    problem_type = getattr(config, "problem_type", None)
    hooks = {module: (set(module._forward_hooks), set(module._forward_pre_hooks), dict(module.__dict__))
             for module in model.modules()}
    try:
        yield
    finally:
        if config is not None and hasattr(config, "problem_type"):
            config.problem_type = problem_type
        for module, (post, pre, attributes) in hooks.items():
            for key in set(module._forward_hooks) - post:
                del module._forward_hooks[key]
            for key in set(module._forward_pre_hooks) - pre:
                del module._forward_pre_hooks[key]
            for name in set(module.__dict__) - set(attributes):  # transformers' "hooks installed" marks
                del module.__dict__[name]


def _takes_any_keyword(params) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

"""The superset call: the example call plus the optional inputs a derived graph can drop.

peftc captures a transformers model once with `labels` (of the shape its head takes),
`num_items_in_batch` (what Trainer passes to a forward with `**kwargs`),
`output_hidden_states=True`, `output_attentions=True`, and the inputs whose default the model
computes where that default is checked to hold (`position_ids`, `token_type_ids`:
peftc.capture.input_defaults), and derives the graph of every call that passes fewer of them
by graph surgery (peftc.capture.specialize) instead of capturing again: the call a user makes
first, Trainer's training call, a call with labels alone, one asking for the hidden states,
one passing its own positions.

The per-layer outputs the two flags record are grown from the two-layer capture of a layer stack
(peftc.capture.recorded_outputs), so they do not make the capture export every layer. A flag is
added only when the config leaves it off (a call without it then means without those outputs)
and a check on the model shows it only adds outputs (Falcon's output_attentions switches its
attention code: there a call with it captures).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.capture.binding import COUNT_DTYPE, RECORDING_FLAGS, forward_signature
from peftc.capture.calls import is_hf_model
from peftc.capture.input_defaults import (
    FLAG_CHECK,
    default_inputs,
    default_inputs_to_check,
    default_values,
    flag_only_adds_outputs,
    settle,
)

SDPA_LOGGER = "transformers.integrations.sdpa_attention"
# class-name endings -> what the head's labels are: one per token, or one per example
TOKEN_LABELS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM")
TOKEN_CLASS_LABELS = ("ForTokenClassification",)
EXAMPLE_CLASS_LABELS = ("ForSequenceClassification", "ForImageClassification")


def superset_calls(model: nn.Module, args: tuple, kwargs: dict, defaults: bool = True) -> list[tuple[tuple, dict]]:
    """The calls to capture, widest first: (args, kwargs) with every droppable optional input added, then
    with the loss inputs alone (for a model whose capture refuses a flag or a defaulted input).
    `defaults=False` leaves out the inputs with a default (for passes that move positions: a graph
    derived by computing the default after them would not be the one they make without the input)."""
    if args or not is_hf_model(model):
        return []
    calls = []
    for extra in (superset_extras(model, kwargs, defaults), ExtraInputs.of(model).loss(kwargs)):
        if extra and all(set(extra) != set(wider) for _, wider in calls):
            calls.append(((), {**kwargs, **extra}))
    return calls


def superset_extras(model: nn.Module, kwargs: dict, defaults: bool = True) -> dict:
    """The inputs the superset call adds to `kwargs`, shaped after this call's main input."""
    extra = ExtraInputs.of(model).loss(kwargs)
    settle(model, [FLAG_CHECK.format(flag) for flag in _flags_to_check(model, kwargs)]
           + (list(default_inputs_to_check(model, kwargs)) if defaults else []), kwargs)
    for flag in _flags_to_check(model, kwargs):  # they switch on outputs a derived graph drops
        if flag_only_adds_outputs(model, flag, kwargs):
            extra[flag] = True
    if defaults:  # a derived graph computes them (peftc.capture.input_defaults)
        extra.update(default_inputs(model, kwargs))
    return extra


def _flags_to_check(model: nn.Module, kwargs: dict) -> list[str]:
    return [flag for flag in RECORDING_FLAGS
            if flag not in kwargs and takes_output_flag(model, flag) and not getattr(model.config, flag)]


def takes_output_flag(model: nn.Module, flag: str) -> bool:
    """Whether the forward takes `flag`: as a parameter, or (transformers 5) through `**kwargs` with the
    config holding its default."""
    params = forward_signature(model).parameters
    return flag in params or (_takes_any_keyword(params) and isinstance(getattr(model.config, flag, None), bool))


@dataclass(frozen=True)
class ExtraInputs:
    """The loss inputs for one model's calls (labels, num_items_in_batch) and the defaulted inputs' values,
    holding only what it reads: not the model (nor its weights).

    A derived graph's guards keep this to make stand-ins for the inputs a call leaves out; holding the
    model there would keep every weight it references alive for as long as the graph lives. The
    defaults are not checked here (superset_extras checks them before they join the superset);
    a stand-in for an input the superset does not hold is never read.
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
        return {**self.loss(kwargs), **default_values(self.params, kwargs)}

    def loss(self, kwargs: dict) -> dict:
        extra: dict = {}
        labels = kwargs.get("labels")
        if labels is None and "labels" in self.params:
            labels = extra["labels"] = self.example_labels(kwargs)
        if isinstance(labels, torch.Tensor) and _takes_any_keyword(self.params) and "num_items_in_batch" not in kwargs:
            extra["num_items_in_batch"] = torch.tensor(labels.numel(), dtype=COUNT_DTYPE, device=labels.device)
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
def superset_quiet() -> Iterator[None]:
    """Without the warning sdpa attention gives for output_attentions=True: the superset asks, not the user."""
    sdpa_logger = logging.getLogger(SDPA_LOGGER)
    sdpa_logger.addFilter(_not_asked_for)
    try:
        yield
    finally:
        sdpa_logger.removeFilter(_not_asked_for)


def _not_asked_for(record: logging.LogRecord) -> bool:
    return "output_attentions" not in record.getMessage()


def _takes_any_keyword(params) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

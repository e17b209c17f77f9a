"""PEFT's `target_modules="all-linear"`: every linear module of a model but its output layer, by full name.

PEFT resolves the shorthand against the model when it wraps it (`_maybe_include_all_linear_layers`):
every `nn.Linear` (and transformers' `Conv1D`) except the output embedding, and a sequence
classifier's head. `peftc.compile` resolves a spec entry whose targets are `["all-linear"]` the same
way, so a LoraConfig's targets carry over as they are; `peftc.from_peft` does it for PEFT folders.
"""

from __future__ import annotations

from torch import nn

from peftc.errors import SpecError

ALL_LINEAR = "all-linear"


def is_all_linear(targets) -> bool:
    """Whether `targets` (a string, or the tuple a spec holds) is PEFT's shorthand alone."""
    if isinstance(targets, str):
        return targets.lower() == ALL_LINEAR
    targets = list(targets)  # a tuple, or the list or set a PEFT config holds
    return len(targets) == 1 and isinstance(targets[0], str) and targets[0].lower() == ALL_LINEAR


def all_linear_names(model: nn.Module, sequence_classifier: bool = False) -> list[str]:
    """The full names of `model`'s linear modules but the output layer (and a classifier's head, where
    `sequence_classifier`: PEFT spares it for SEQ_CLS), as PEFT's 'all-linear' selects them."""
    linear = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D
        linear = (nn.Linear, Conv1D)
    except ImportError:
        pass
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and sequence_classifier:
        head = getattr(model, "score", None) or getattr(model, "classifier", None)
    names = [n for n, m in model.named_modules() if isinstance(m, linear) and m is not head]
    if not names:
        raise SpecError("target_modules: 'all-linear' found no linear layer in the model")
    return names

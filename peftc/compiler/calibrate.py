"""Calibration for the data-driven LoRA inits (CorDA, EVA): run the user's data through the base graph
and keep what each targeted site's input looked like.

    peftc.compile(model, spec, calibration=batches)

`batches` is an iterable of model inputs (a tensor: model(x); a tuple or list: model(*batch); a
dict: model(**batch), as a DataLoader yields them) or a function `run(model)` that calls the model
it is given as often as it likes (PEFT's `preprocess_corda(model, config, run_model=...)`).
The model it sees is the compiled base, in eval mode and without gradients: a graph whose site ops
hand their inputs to a recorder (passes/observe_site_inputs.py), so any op that reads a weight is
observed, not only nn.Linear modules. The user's model is never called.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from peftc.compiler.compilation import Compilation
from peftc.compiler.eva_ranks import with_eva_ranks
from peftc.compiler.plan import Plan
from peftc.errors import SpecError
from peftc.ir.calibration import SiteInputs
from peftc.passes.observe_site_inputs import needs_calibration, observe_site_inputs
from peftc.pipeline.runner import Step
from peftc.pipeline.state import SharedState
from peftc.runtime.compiled import CompiledModel

IGNORE_INDEX = -100  # transformers' label for tokens the loss skips


@dataclass(frozen=True, eq=False)
class CalibrationPlan(Plan):
    """The base model as captured, plus the recorder calls; no adapters, nothing trains."""

    def steps(self, spec, half_base: bool = False) -> list[Step]:
        return [Step("observe_site_inputs", observe_site_inputs)]


def calibrate(compilation: Compilation, args: tuple, kwargs: dict, data: Any) -> Compilation:
    """`compilation` carrying the input statistics of its CorDA / EVA sites on `data`."""
    if not needs_calibration(compilation.spec):
        if data is not None:
            raise SpecError("calibration: no adapter entry reads calibration data (LoRA's init 'corda' or "
                            "'eva' does); remove the calibration argument")
        return compilation
    if data is None:
        return compilation  # insert_lora raises the SpecError that names the entry
    recorder = SiteInputs()
    observing = replace(compilation, adapter_root=nn.Module(), shared=SharedState(calibration=recorder))
    plan = CalibrationPlan("calibrate")
    base = CompiledModel(observing, plan, observing.build(args, kwargs, plan), (args, kwargs), training=False)
    with torch.no_grad():
        _run(base.eval(), data, recorder)
    return replace(compilation, spec=with_eva_ranks(compilation.spec, recorder),
                   shared=replace(compilation.shared, calibration=recorder))


def _run(model: nn.Module, data: Any, recorder: SiteInputs) -> None:
    if callable(data):
        data(model)
        return
    try:
        batches = iter(data)
    except TypeError as err:
        raise SpecError(f"calibration: expected an iterable of model inputs or a function run(model), got "
                        f"{type(data).__name__}") from err
    count = 0
    for batch in batches:
        if isinstance(batch, dict):
            recorder.token_mask = token_mask(batch)
            model(**batch)
            recorder.token_mask = None
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            model(batch)
        count += 1
    if not count:
        raise SpecError("calibration: the data holds no batches")


def token_mask(batch: dict) -> torch.Tensor | None:
    """The tokens EVA learns from, as PEFT's language-modeling default picks them: attention_mask, and
    labels other than -100 (the loss's ignore index) when the batch has labels."""
    mask = batch.get("attention_mask")
    mask = None if mask is None else mask.bool()
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        keep = labels != IGNORE_INDEX
        mask = keep if mask is None else mask & keep
    return mask

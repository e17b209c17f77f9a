"""AdaloraCallback: AdaLoRA's rank allocation under a transformers Trainer (needs transformers)."""

from __future__ import annotations

from transformers import TrainerCallback

from .rank_allocation import update_and_allocate


class AdaloraCallback(TrainerCallback):
    """Calls `cm.update_and_allocate(step)` after every optimizer step, before the gradients are zeroed
    (Trainer's on_optimizer_step), with the count of steps done before this one, as a manual loop would.

        trainer = Trainer(model=cm, ..., callbacks=[AdaloraCallback(cm)])
    """

    def __init__(self, cm):
        self.cm = cm

    def on_optimizer_step(self, args, state, control, **kwargs):
        update_and_allocate(self.cm, state.global_step)
        return control

"""The PeftModel methods scripts call, on a compiled model: it replaces `get_peft_model`'s result.

Attributes the compiled model lacks are read from the user's model (runtime.facade), so without
these a transformers model's own `enable_input_require_grads` or PEFT-integration methods would
run on the user's model: hooking or changing it, and never reaching the compiled graphs.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from peftc.errors import SpecError

DEFAULT_ADAPTER = "default"  # PEFT's name for a model's only adapter


class PeftModelSurface:
    """Mixin for CompiledModel (before GraphDispatch, whose forward it wraps)."""

    # -- counts (PeftModel.get_nb_trainable_parameters / print_trainable_parameters) ----------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all): the adapters and unfrozen base tensors, and every parameter the model runs."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- adapter names: a compiled model holds one adapter, PEFT's "default" -------------------------
    @property
    def active_adapter(self) -> str:
        return DEFAULT_ADAPTER

    @property
    def active_adapters(self) -> list[str]:
        return [DEFAULT_ADAPTER]

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name != DEFAULT_ADAPTER:
            raise ValueError(f"set_adapter({adapter_name!r}): a compiled model holds one adapter, {DEFAULT_ADAPTER!r}; "
                             "for several adapters use peftc.serve_adapters (inference, adapter_ids per row) or "
                             "peftc.train_adapters (training)")

    def get_base_model(self):
        """This model: PeftModel.get_base_model() is the base model with the adapters in it, which is what
        the compiled model runs. The user's own model, without adapters, is `compilation.source`."""
        return self

    # -- the base model alone (PeftModel.disable_adapter: DPO's reference forward, ...) -------------
    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block, calls run the user's model itself (the base weights, no adapter), in this
        model's train/eval mode. A quantized base runs unquantized there: the user's model is."""
        self.__dict__["_adapters_disabled"] = True
        try:
            yield
        finally:
            self.__dict__["_adapters_disabled"] = False

    def forward(self, *args, **kwargs):
        if not self.__dict__.get("_adapters_disabled"):
            return super().forward(*args, **kwargs)
        base = self.compilation.source
        was_training = base.training
        base.train(self.training)
        try:
            return base(*args, **kwargs)
        finally:
            base.train(was_training)

    # -- gradient checkpointing helpers -----------------------------------------------------------
    def enable_input_require_grads(self) -> None:
        """Nothing to do: peftc checkpoints layers in the non-reentrant form, which needs no input that
        requires grad (PEFT's reentrant default does). TRL calls this on PEFT models; the transformers
        version would hook the user's embedding layer instead."""

    def disable_input_require_grads(self) -> None:
        """Nothing to undo (enable_input_require_grads)."""

    # -- save_pretrained: what PeftModel.from_pretrained reads, and what load_adapter reads -------
    def save_pretrained(self, save_directory, **_ignored) -> None:
        """spec.json + adapter.safetensors (peftc's load_adapter, from_pretrained-free), and where PEFT
        has the method, adapter_config.json + adapter_model.safetensors beside them (PeftModel.from_pretrained).
        Each pair is written whole before it appears (runtime.checkpoint)."""
        directory = Path(save_directory)
        self.save_adapter(directory)
        with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.peft-") as tmp:
            try:
                written = self.save_adapter(Path(tmp) / "peft", format="peft")
            except SpecError:  # a method or mix PEFT has no config for: peftc's files alone
                return
            # the weights first, adapter_config.json last: PEFT reads a folder by its config, so a save that
            # fails between the moves leaves no config pointing at missing or stale weights
            for file in sorted(written.iterdir(), key=lambda f: f.name == "adapter_config.json"):
                shutil.move(str(file), str(directory / file.name))

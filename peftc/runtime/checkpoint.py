"""Adapter checkpoints: adapter.safetensors + spec.json, written atomically.

A save goes to a temporary folder beside the target and is renamed into place, so a failed
save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from peftc.errors import CheckpointError
from peftc.interop.save_peft import save_peft
from peftc.spec.parse import Spec

WEIGHTS_FILE = "adapter.safetensors"
SPEC_FILE = "spec.json"
FORMAT_VERSION = "1"


def save_adapter(cm, directory, format: str = "peftc") -> Path:
    if format == "peft":
        return save_peft(cm, directory)
    if format != "peftc":
        raise ValueError(f"save_adapter: format expected 'peftc' or 'peft', got {format!r}")
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in cm.adapter_state_dict().items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "peftc", "version": FORMAT_VERSION})
        (tmp / SPEC_FILE).write_text(json.dumps(cm.spec.to_dict(), indent=2) + "\n")
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Move `tmp` to `directory`; an existing checkpoint there is replaced only once the new one is whole."""
    if directory.exists():
        old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
        os.rmdir(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def read_adapter(directory) -> tuple[Spec, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, spec_file = directory / WEIGHTS_FILE, directory / SPEC_FILE
    for f in (weights, spec_file):
        if not f.is_file():
            raise CheckpointError(f"adapter checkpoint {str(directory)!r} has no {f.name}; "
                                  "expected a folder written by CompiledModel.save_adapter")
    try:
        spec = Spec.from_dict(json.loads(spec_file.read_text()))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{spec_file}: not valid JSON ({err}); the checkpoint is damaged") from err
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: cannot be read ({err}); the file is truncated or not safetensors") from err
    return spec, tensors


def load_adapter(cm, directory) -> None:
    spec, tensors = read_adapter(directory)
    if spec.to_dict() != cm.spec.to_dict():
        raise CheckpointError(
            f"adapter in {str(directory)!r} was trained with a different spec; compile the model with "
            f"Spec.load({str(Path(directory) / SPEC_FILE)!r}) to load it")
    own = cm.adapter_state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"adapter in {str(directory)!r} does not fit this model: "
            + (f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}")
            + f" ({len(missing)} missing, {len(unexpected)} unexpected); was it saved from another model?")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(f"tensor {name!r}: checkpoint shape {tuple(value.shape)} != model shape "
                                  f"{tuple(own[name].shape)}")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value.to(own[name].dtype))

"""Adapter checkpoints: adapter.safetensors + spec.json, written atomically.

A save goes to a temporary folder beside the target and is swapped into place in one step
(`peftc.core.files.atomic_dir`): at every instant the target holds the complete old
checkpoint or the complete new one, and the next save cleans what an interrupted one left.

A load refuses what it cannot use exactly, with a CheckpointError naming the file and the
tensor: a spec.json that is not a valid spec, a tensor whose values would change in the
model's dtype (a float tensor is cast only when every value survives, as bfloat16 -> float32
always does; integer or bool tensors never), and a tensor holding NaN or infinity — adapter weights that are not finite are a diverged run, never
something to train or serve from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from peftc.core.distributed import (
    any_sharded,
    placed_like,
    wait_for_writer,
    whole,
    writes_files,
)
from peftc.core.files import atomic_dir
from peftc.errors import CheckpointError, SpecError
from peftc.interop.save_peft import save_peft
from peftc.spec.parse import Spec

WEIGHTS_FILE = "adapter.safetensors"
SPEC_FILE = "spec.json"
FORMAT_VERSION = "1"
TRAINER_FILE = "model.safetensors"  # transformers' Trainer.save_model of a model that is not a PreTrainedModel


def trainer_folder_message(directory) -> str:
    """What a folder holding only TRAINER_FILE is and how to use it: Trainer.save_model (and each save_steps
    checkpoint) writes a compiled model's state_dict there, the adapter tensors by name, but no spec and no
    adapter_config.json, since it calls save_pretrained only on a PreTrainedModel or a PeftModel."""
    return (f"{str(directory)!r} holds {TRAINER_FILE} alone, what transformers' Trainer.save_model writes for a "
            "compiled model (its adapter tensors, no spec or adapter_config.json: Trainer calls save_pretrained only "
            "on a PreTrainedModel or PeftModel). Load it into the model compiled with the training spec: "
            f"peftc.compile(model, spec).load_adapter({str(directory)!r}) (CLI: --adapter DIR --spec SPEC); "
            "then cm.save_pretrained(new_dir) writes a folder PeftModel.from_pretrained reads (save_pretrained "
            "replaces the whole folder it is given, so give it a new one)")


def is_trainer_folder(directory) -> bool:
    """A folder with Trainer's state-dict file and neither peftc's spec nor a PEFT config."""
    path = Path(directory)
    return (path / TRAINER_FILE).is_file() and not (path / SPEC_FILE).is_file() \
        and not (path / "adapter_config.json").is_file()


def save_adapter(cm, directory, format: str = "peftc") -> Path:
    if format in ("peft", "peft_lora"):  # peft_lora: residual inits as plain LoRA (interop/peft_plain_lora.py)
        return save_peft(cm, directory, plain_lora=format == "peft_lora")
    if format != "peftc":
        raise ValueError(f"save_adapter: format expected 'peftc', 'peft' or 'peft_lora', got {format!r}")
    from safetensors.torch import save_file

    # Under FSDP2 every rank calls this: each gathers the shards, rank 0 alone writes (peftc.core.distributed).
    own = cm.adapter_state_dict()
    sharded = any_sharded(own.values())
    tensors = {name: whole(t.detach()).to("cpu").contiguous().clone() for name, t in own.items()}
    if writes_files(sharded):
        with atomic_dir(directory, CheckpointError) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "peftc", "version": FORMAT_VERSION})
            (tmp / SPEC_FILE).write_text(json.dumps(cm.spec.to_dict(), indent=2) + "\n", encoding="utf-8")
    wait_for_writer(sharded)
    return Path(directory)


def checked_tensor(file, name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`value` in `target`'s dtype, or CheckpointError naming `file` and `name` if that would change a value.

    A float tensor is cast to the model's float dtype only when every value survives the round
    trip (bfloat16 -> float32 always does; float32 -> bfloat16 only for values bfloat16 holds);
    integer or bool tensors for float parameters are refused.
    """
    if value.dtype == target.dtype:
        return value
    cast = value.to(target.dtype) if value.is_floating_point() == target.is_floating_point() else None
    if cast is None or not torch.equal(cast.to(value.dtype), value):
        raise CheckpointError(
            f"{file}: tensor {name!r} is {_dtype_name(value)} and the model's is {_dtype_name(target)}; "
            f"casting would change its values, so peftc refuses (it casts only where every value survives, "
            f"such as bfloat16 -> float32); save the adapter from a model in {_dtype_name(target)}")
    return cast


def refuse_non_finite(file, tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointError naming `file` and the first tensor (as stored in the file) holding NaN or infinity."""
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{file}: tensor {name!r} holds {bad} NaN or infinite value(s); the run that "
                                  "saved it diverged; load an earlier checkpoint")


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def read_adapter(directory) -> tuple[Spec, dict[str, torch.Tensor]]:
    directory = Path(directory)
    weights, spec_file = directory / WEIGHTS_FILE, directory / SPEC_FILE
    for f in (weights, spec_file):
        if not f.is_file():
            raise CheckpointError(f"adapter checkpoint {str(directory)!r} has no {f.name}; "
                                  "expected a folder written by CompiledModel.save_adapter")
    return read_spec_json(spec_file), read_tensors(weights)


def read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights}: cannot be read ({err}); the file is truncated or not safetensors") from err


def read_spec_json(spec_file: Path) -> Spec:
    """The spec a checkpoint was saved with; CheckpointError naming the file if it is damaged."""
    try:
        data = json.loads(spec_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{spec_file}: not UTF-8 text ({err.reason} at byte {err.start}); "
                              "the checkpoint is damaged") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit integer, deep nesting
        raise CheckpointError(f"{spec_file}: not valid JSON ({str(err)[:200]}); the checkpoint is damaged") from err
    try:
        return Spec.from_dict(data)
    except SpecError as err:
        raise CheckpointError(f"{spec_file}: not a valid spec: {err}") from err


def _adapter_fields(spec) -> dict:
    """What must agree for tensors to load: everything but adapter_dtype (a bfloat16 save loads into float32
    adapters, a float32 one into bfloat16 ones when its values fit: checked_tensor)."""
    return {k: v for k, v in spec.to_dict().items() if k != "adapter_dtype"}


def load_adapter(cm, directory) -> None:
    """Load a save_adapter folder, or what transformers' Trainer.save_model / a Trainer checkpoint wrote for
    the compiled model (TRAINER_FILE: its state_dict, the adapter tensors by name, no spec: this model's)."""
    weights = Path(directory) / WEIGHTS_FILE
    if not (Path(directory) / SPEC_FILE).is_file() and (Path(directory) / TRAINER_FILE).is_file():
        weights = Path(directory) / TRAINER_FILE
        spec, tensors = cm.spec, read_tensors(weights)
    else:
        spec, tensors = read_adapter(directory)
    if _adapter_fields(spec) != _adapter_fields(cm.spec):
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
    refuse_non_finite(weights, tensors)
    checked = {}
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(f"{weights}: tensor {name!r}: checkpoint shape {tuple(value.shape)} != model "
                                  f"shape {tuple(own[name].shape)}")
        checked[name] = checked_tensor(weights, name, value, own[name])
    with torch.no_grad():  # every tensor checked first: a refused load changes nothing
        for name, value in checked.items():
            own[name].copy_(placed_like(value, own[name]))  # FSDP2: this rank's shard of the whole tensor

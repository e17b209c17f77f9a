"""peftc.from_peft: compile a model with an HF PEFT adapter directory (or config) and its weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.capture.captured import CapturedGraphs
from peftc.compiler.compile import compile_sharing_captures
from peftc.core.all_linear import all_linear_names, is_all_linear
from peftc.errors import CheckpointError, SpecError
from peftc.passes.copy_params import copied_names
from peftc.runtime.checkpoint import (
    SPEC_FILE,
    WEIGHTS_FILE,
    checked_tensor,
    is_trainer_folder,
    read_adapter,
    refuse_non_finite,
    trainer_folder_message,
)
from peftc.spec.parse import Spec

from .peft_config import as_config_dict, spec_dict_from_peft
from .peft_files import CONFIG_FILE, PICKLE_FILE, SAFETENSORS_FILE
from .peft_keys import PREFIX, is_unused_original, normalize, peft_names
from .peft_prefix import split_table
from .peft_rows import is_seq2seq_prompt
from .peft_vblora import is_topk_file, logits_from_topk


def from_peft(model: nn.Module, source: Any, *, allow_pickle: bool = False, autocast_adapter_dtype: bool = True,
              captured: CapturedGraphs | None = None, **compile_kwargs):
    """A CompiledModel computing what `PeftModel.from_pretrained(model, source)` computes.

    `source` is a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) or its
    adapter_config.json, or a config alone (a PeftConfig, a dict, another .json file), which
    gives fresh adapters.
    The model itself is never written: weights PEFT would load into it (modules_to_save, biases)
    become trainable copies. `autocast_adapter_dtype` is PEFT's: adapters over a float16/bfloat16
    base are float32 (the spec's adapter_dtype). `compile_kwargs` go to peftc.compile; `captured` is a
    capture store shared with other compiles of the same model (compile_sharing_captures).
    """
    directory = _adapter_dir(source)
    if directory is None:
        spec_dict = spec_dict_for(model, source, saved=False, autocast_adapter_dtype=autocast_adapter_dtype)
    else:
        spec_dict = spec_dict_from_folder(model, directory / CONFIG_FILE, autocast_adapter_dtype)
    if directory is None:
        return compile_sharing_captures(model, spec_dict, captured, **compile_kwargs)
    tensors = encoder_prompt_rows(as_config_dict(directory / CONFIG_FILE), read_peft_weights(directory, allow_pickle))
    refuse_non_finite(directory / SAFETENSORS_FILE, tensors)  # as stored: VB-LoRA's rebuilt logits hold -inf
    spec_dict["adapters"] += overriding_copies(spec_dict, tensors, model)
    cm = compile_sharing_captures(model, spec_dict, captured, **compile_kwargs)
    load_peft_tensors(cm, tensors, directory)
    return cm


def spec_dict_for(model: nn.Module, config: Any, saved: bool, autocast_adapter_dtype: bool = True) -> dict:
    """`saved`: the config comes with its saved weights (an adapter directory)."""
    config = as_config_dict(config)
    config = resolve_all_linear(config, model)
    config = resolve_token_indices(config, model)
    config = present_modules_to_save(config, model)
    return spec_dict_from_peft(config, saved=saved, autocast_adapter_dtype=autocast_adapter_dtype)


def spec_dict_from_folder(model: nn.Module, config_file: Path, autocast_adapter_dtype: bool = True) -> dict:
    """The spec for a PEFT folder's config; a config peftc cannot read is a CheckpointError naming the file."""
    try:
        return spec_dict_for(model, config_file, saved=True, autocast_adapter_dtype=autocast_adapter_dtype)
    except SpecError as err:
        raise CheckpointError(f"{config_file}: {err}") from err
    except (TypeError, KeyError, AttributeError, ValueError) as err:  # a field of the wrong type or shape
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{config_file}: a field has the wrong type or shape ({type(err).__name__}: "
                              f"{str(err)[:200]}); the file is damaged or not written by PEFT") from err


def _adapter_dir(source: Any) -> Path | None:
    if not isinstance(source, (str, Path)):
        return None
    path = Path(source)
    if path.is_file() and path.name == CONFIG_FILE:
        return path.parent
    if path.is_dir():
        if is_trainer_folder(path):
            raise CheckpointError(trainer_folder_message(path))
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{str(path)!r} has no {CONFIG_FILE}; expected a PEFT adapter directory")
        return path
    if path.suffix == ".json" and path.is_file():
        return None  # a bare config file: compile with fresh adapters
    raise CheckpointError(f"{str(path)!r} does not exist; expected a PEFT adapter directory")


def read_peft_weights(directory: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = directory / SAFETENSORS_FILE
    if weights.is_file():
        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{weights}: cannot be read ({err}); the file is truncated or not "
                                  "safetensors") from err
    pickled = directory / PICKLE_FILE
    if not pickled.is_file():
        raise CheckpointError(f"{str(directory)!r} has no {SAFETENSORS_FILE} (nor {PICKLE_FILE})")
    if not allow_pickle:
        raise CheckpointError(f"{pickled} is a pickle, which can run code when loaded; convert it to "
                              f"{SAFETENSORS_FILE}, or pass allow_pickle=True if you trust its source")
    try:
        return torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged or non-tensor pickles
        raise CheckpointError(f"{pickled}: cannot be read ({err})") from err


def encoder_prompt_rows(config: dict, tensors: dict) -> dict:
    """An encoder-decoder's prompt table (2N rows) as the N its prompt tuning reads (peft_rows.read_prompt)."""
    table = tensors.get("prompt_embeddings")
    if not is_seq2seq_prompt(config) or table is None or table.dim() != 2:
        return tensors
    return {**tensors, "prompt_embeddings": table[: config["num_virtual_tokens"]]}


def resolve_all_linear(config: dict, model: nn.Module) -> dict:
    """PEFT's 'all-linear': every nn.Linear / Conv1D module except the output layer, by full name."""
    if not is_all_linear(config.get("target_modules") or ()):
        return config
    names = all_linear_names(model, sequence_classifier=config.get("task_type") == "SEQ_CLS")
    return {**config, "target_modules": names}


def resolve_token_indices(config: dict, model: nn.Module) -> dict:
    """LoRA's trainable_token_indices as a bare list means the input embedding: name it."""
    indices = config.get("trainable_token_indices")
    if not isinstance(indices, list) or not indices:
        return config
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is embedding), None)
    if name is None:
        raise SpecError("trainable_token_indices: a list means the model's input embedding, and this model has "
                        "no get_input_embeddings(); give {embedding module name: token ids}")
    return {**config, "trainable_token_indices": {name: indices}}


def present_modules_to_save(config: dict, model: nn.Module) -> dict:
    """PEFT's task types add head names (SEQ_CLS: classifier and score) whether the model has them or
    not; keep those some module name ends with (PEFT's plain endswith), once each."""
    saved = config.get("modules_to_save")
    if not saved:
        return config
    names = [n for n, _ in model.named_modules()]
    kept = [s for s in dict.fromkeys(saved) if any(n.endswith(s) for n in names)]  # save_target's rule
    return {**config, "modules_to_save": kept or None}


def overriding_copies(spec_dict: dict, tensors: dict, model: nn.Module) -> list[dict]:
    """Copy entries for base weights the checkpoint changes that no entry copies yet (e.g. a resized
    embedding PEFT saved with save_embedding_layers); unchanged ones are skipped at load."""

    params = dict(model.named_parameters(remove_duplicate=False))
    spec = Spec.from_dict(spec_dict)
    covered = {n for i, e in enumerate(spec.adapters) if e.method == "copy"
               for n in copied_names(e, params, f"adapters[{i}]")}
    extra = []
    for key, value in tensors.items():
        fqn = normalize(key)[len(PREFIX):] if key.startswith(PREFIX) and not is_unused_original(key) else None
        if fqn in params and fqn not in covered and not _same(params[fqn], value):
            owner, _, leaf = fqn.rpartition(".")
            extra.append({"method": "copy", "targets": ["re:" + re.escape(owner)], "params": [leaf]})
    return extra


def _same(param: torch.Tensor, value: torch.Tensor) -> bool:
    return tuple(param.shape) == tuple(value.shape) and torch.equal(param.detach().cpu(), value.to(param.dtype))


def load_peft_tensors(cm, tensors: dict[str, torch.Tensor], source) -> None:
    """Copy PEFT tensors into the compiled model's adapters, checking names and shapes first."""
    names = peft_names(cm)
    ours_by_key = {normalize(key): name for name, key in names.items()}
    own = cm.adapter_state_dict()
    tensors = split_table(names, {k: tuple(own[n].shape) for n, k in names.items() if n in own}, tensors)
    if is_topk_file(tensors):  # VB-LoRA saved with save_only_topk_weights
        tensors = logits_from_topk(tensors)
    params = dict(cm.compilation.source.named_parameters(remove_duplicate=False))
    plan, unexpected = [], []
    for key, value in tensors.items():
        name = ours_by_key.get(normalize(key))
        if is_unused_original(key):
            continue
        if name is None:
            fqn = normalize(key)[len(PREFIX):]
            if not (fqn in params and _same(params[fqn], value)):  # PEFT also saves untouched base weights
                unexpected.append(key)
            continue
        target = own[name] if name in own else _adapter_tensor(cm, name)
        value = _as_peftc_shape(value, target)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError(f"{source}: tensor {key!r}: checkpoint shape {tuple(value.shape)} != model shape "
                                  f"{tuple(target.shape)} (peftc tensor {name!r})")
        if name not in own:  # a tensor peftc regenerates (VeRA's seeded projections): it must agree
            if not torch.allclose(value.to(target.dtype), target.detach(), atol=1e-6, rtol=1e-5):
                raise CheckpointError(f"{source}: tensor {key!r}: differs from the projection peftc draws from the config's "
                                      "seed (projection_prng_key); the adapter was saved by an incompatible PEFT")
            continue
        plan.append((key, name, value))
    regenerated = {normalize(k) for k, n in ours_by_key.items() if n not in own}
    missing = sorted(set(ours_by_key) - regenerated - {normalize(k) for k in tensors})
    if missing or unexpected:
        raise CheckpointError(
            f"PEFT adapter {str(source)!r} does not fit this model: "
            + (f"missing tensor {missing[0]!r}" if missing else f"unexpected tensor {unexpected[0]!r}")
            + f" ({len(missing)} missing, {len(unexpected)} unexpected); was it saved for another model?")
    checked = [(name, checked_tensor(source, key, value, own[name])) for key, name, value in plan]
    with torch.no_grad():  # every tensor checked first: a refused load changes nothing
        for name, value in checked:
            own[name].copy_(value)


def _adapter_tensor(cm, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(cm.adapter_root.get_submodule(owner), leaf)


def _as_peftc_shape(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PEFT's IA3 vectors are [out, 1] or [1, in] ([1, C, 1, ...] on a conv); peftc's are flat."""
    if target.dim() == 1 and value.dim() >= 2 and value.numel() == target.numel() == max(value.shape):
        return value.reshape(-1)
    return value


def load_adapter_dir(model: nn.Module, path, *, spec: Any = None, allow_pickle: bool = False,
                     captured: CapturedGraphs | None = None, **compile_kwargs):
    """A CompiledModel from a peftc checkpoint (spec.json + adapter.safetensors) or a PEFT adapter
    directory (adapter_config.json), whichever `path` is: the CLI's --adapter. A folder transformers'
    Trainer wrote for a compiled model (model.safetensors alone) needs the training `spec`.
    `captured`: a capture store shared with other compiles of the same model (serve_adapters' and
    train_adapters' per-adapter folders: one export of the base for all of them)."""
    path = Path(path)
    if is_trainer_folder(path):
        if spec is None:
            raise CheckpointError(trainer_folder_message(path))
        return compile_sharing_captures(model, spec, captured, **compile_kwargs).load_adapter(path)
    if (path / SPEC_FILE).is_file():
        spec, _ = read_adapter(path)
        cm = compile_sharing_captures(model, spec, captured, **compile_kwargs)
        return cm.load_adapter(path)
    if (path / CONFIG_FILE).is_file():
        return from_peft(model, path, allow_pickle=allow_pickle, captured=captured, **compile_kwargs)
    raise CheckpointError(f"{str(path)!r} is neither a peftc checkpoint ({SPEC_FILE} + {WEIGHTS_FILE}) nor a "
                          f"PEFT adapter directory ({CONFIG_FILE})")


"""peftc Spec <-> HF PEFT adapter config (adapter_config.json).

Reading: `spec_dict_from_peft(config)` turns a config into a spec dict through its row in
peft_rows.PEFT_TYPES: the method's entry, plus `copy` entries for `modules_to_save` and `bias`
(peftc trains copies, so the user's model is never written). Every config field is mapped,
known to be metadata, or at its default: anything else is a SpecError naming the field.

Writing: `peft_config_from_spec(spec)` is the inverse wherever PEFT can express the spec.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from peftc.errors import CheckpointError, SpecError
from peftc.spec.methods import METHODS

from . import peft_targets as pt
from .peft_rows import PEFT_TYPES, WRITERS, PeftRow, supported_types

METADATA_FIELDS = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                   "auto_mapping", "peft_version", "megatron_core", "qalora_group_size",
                   "ensure_weight_tying", "fan_in_fan_out"}  # fan_in_fan_out: peftc reads the layout off the op


def as_config_dict(config: Any) -> dict:
    """A PEFT config as a plain dict: a PeftConfig object, a mapping, or an adapter_config.json path."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "adapter_config.json"
        config = _read_config_file(path)
    if hasattr(config, "to_dict") and not isinstance(config, Mapping):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise SpecError(f"peft config: expected a PeftConfig, a mapping or a path, got {type(config).__name__}")
    return {k: getattr(v, "value", v) for k, v in config.items()}  # enums (PeftType, TaskType) to str


def _read_config_file(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{str(path)!r} does not exist; expected a PEFT adapter_config.json") from err
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); the file is damaged") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit integer, deep nesting
        raise CheckpointError(f"{path}: not valid JSON ({str(err)[:200]}); the file is damaged") from err
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a JSON object of PEFT config fields, got {type(data).__name__}")
    return data


def spec_dict_from_peft(config: Any, saved: bool = False, autocast_adapter_dtype: bool = True) -> dict:
    """`saved`: the config comes with its saved weights (from_peft on an adapter directory).
    `autocast_adapter_dtype`: PEFT's argument of get_peft_model / PeftModel.from_pretrained (not a config
    field; a config dict that holds it wins), as the spec's adapter_dtype."""
    cfg = dict(as_config_dict(config))
    autocast_adapter_dtype = cfg.pop("autocast_adapter_dtype", autocast_adapter_dtype)
    peft_type = str(cfg.get("peft_type", "")).upper()
    row = PEFT_TYPES.get(peft_type)
    if row is None:
        raise SpecError(f"peft_type: {cfg.get('peft_type')!r} is not supported; supported: {supported_types()}")
    if row.method not in METHODS or not row.verified:
        raise SpecError(f"peft_type: {peft_type} is not yet supported by this peftc build (it needs the "
                        f"{row.method!r} method); supported: {supported_types()}")
    _refuse_unmapped(cfg, row)
    read = row.read_saved if saved and row.read_saved is not None else row.read
    return {"adapters": read(cfg), "adapter_dtype": adapter_dtype_from_autocast(autocast_adapter_dtype)}


def adapter_dtype_from_autocast(autocast_adapter_dtype: bool) -> str:
    """PEFT's autocast_adapter_dtype as the spec's adapter_dtype: True keeps adapters over a
    float16/bfloat16 base in float32 ("float32"), False in the base's dtype ("base")."""
    if not isinstance(autocast_adapter_dtype, bool):
        raise SpecError(f"autocast_adapter_dtype: expected true or false, got {autocast_adapter_dtype!r}")
    return "float32" if autocast_adapter_dtype else "base"


def autocast_from_adapter_dtype(spec) -> bool:
    """The autocast_adapter_dtype to give PEFT's get_peft_model / PeftModel.from_pretrained for `spec`
    (PEFT keeps it out of adapter_config.json, as an argument of those calls)."""
    return spec.adapter_dtype == "float32"


def _refuse_unmapped(cfg: dict, row: PeftRow) -> None:
    for name, value in cfg.items():
        fixed = dict(row.fixed)
        if name in fixed and value == fixed[name]:
            continue
        if name in row.mapped or name in METADATA_FIELDS or _is_default(value):
            continue
        raise SpecError(f"{name}: peftc cannot express {row.peft_type} {name}={value!r}"
                        + (f" (only {fixed[name]!r})" if name in fixed else "")
                        + f"; fields it maps: {sorted(row.mapped)}")


def _is_default(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


# -- spec -> PEFT ----------------------------------------------------------------------------

def peft_config_from_spec(spec) -> dict:
    """The PEFT adapter_config.json for a spec; SpecError naming the field PEFT cannot express."""
    main = [(i, e) for i, e in enumerate(spec.adapters) if e.method != "copy"]
    tokens = [e for _, e in main if e.method == "trainable_tokens"]
    if len(main) > len(tokens) and tokens:  # trained beside LoRA: its trainable_token_indices
        main = [(i, e) for i, e in main if e.method != "trainable_tokens"]
    if len(main) != 1:
        raise SpecError(f"adapters: a PEFT adapter holds exactly one method besides copies; this spec has "
                        f"{[e.method for _, e in main]}")
    index, entry = main[0]
    if entry.method not in WRITERS:
        raise SpecError(f"adapters[{index}].method: peftc cannot write {entry.method!r} as a PEFT config yet; "
                        f"it can write {sorted(WRITERS)}")
    cfg = WRITERS[entry.method](entry, f"adapters[{index}]")
    if tokens and entry.method != "trainable_tokens":
        _write_token_indices(entry, tokens, cfg, f"adapters[{index}]")
    _write_copies(spec, entry, cfg)
    _write_trainable(spec, cfg)
    return cfg


def _write_token_indices(entry, tokens: list, cfg: dict, field: str) -> None:
    if entry.method not in ("lora", "dora"):
        raise SpecError(f"{field}: PEFT trains tokens beside LoRA only (trainable_token_indices), not beside "
                        f"{entry.method!r}")
    out = {}
    for t in tokens:
        for target in t.targets:
            if not pt.is_bare(target):
                raise SpecError(f"trainable_tokens.targets: {target!r}: PEFT's trainable_token_indices needs "
                                "module names")
            out[target] = list(t.indices)
    cfg["trainable_token_indices"] = out


def _write_copies(spec, entry, cfg: dict) -> None:
    saved = []
    for i, copy in enumerate(spec.adapters):
        if copy.method != "copy":
            continue
        field = f"adapters[{i}]"
        if not copy.params:
            saved += [pt.save_name(t, f"{field}.targets") for t in copy.targets]
        elif tuple(copy.params) == ("bias",):
            cfg["bias"] = _bias_mode(copy, entry, field)
        else:
            raise SpecError(f"{field}.params: PEFT can copy whole modules (modules_to_save) or biases, "
                            f"not {list(copy.params)}")
    if saved:
        cfg["modules_to_save"] = saved
        if not hasattr(entry, "targets"):  # prompt / prefix: no target modules to exclude from
            return
        exclusions = {pt.save_exclusion(n) for n in saved}
        kept = [p for p in getattr(entry, "exclude", ()) if p not in exclusions]
        cfg["exclude_modules"] = pt.targets_to_peft(tuple(kept), "exclude")


def _bias_mode(copy, entry, field: str) -> str:
    if tuple(copy.targets) == ("re:.*",):
        return "all"
    if tuple(copy.targets) == tuple(entry.targets):
        return "lora_only" if entry.method == "dora" else f"{entry.method}_only"
    raise SpecError(f"{field}.targets: PEFT trains the biases of all modules or of the adapted ones only; "
                    f"use ['re:.*'] or the adapter's own targets {list(entry.targets)}")


def _write_trainable(spec, cfg: dict) -> None:
    if not spec.trainable:
        return
    if all(p in ("*.bias", "re:.*bias", "re:.*\\.bias") for p in spec.trainable):
        cfg["bias"] = "all"
        return
    raise SpecError(f"trainable: PEFT can only train biases in place (bias='all'), not {list(spec.trainable)}; "
                    "use a 'copy' entry for whole modules (modules_to_save)")

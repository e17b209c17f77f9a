"""The PEFT spec: which methods go where, which base parameters train, how the base is stored.

A spec file is data, never code: entries are parsed through the method table in
`peftc.spec.methods` (an allow-list), each into its own frozen dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

from peftc.core.fields import (
    dataclass_to_dict,
    fail,
    one_of,
    optional_pattern_list,
    parse_dataclass,
    unknown_field,
)
from peftc.core.files import atomic_write_text
from peftc.errors import SpecError
from peftc.interop.peft_config import peft_config_from_spec, spec_dict_from_peft
from peftc.spec.methods import METHODS, QUANTIZE_CONFIG

SPEC_VERSION = 1
TOP_LEVEL_FIELDS = ("version", "adapters", "trainable", "quantize", "adapter_dtype")
# "float32": adapter tensors over a float16/bfloat16 base are kept and computed in float32 (as HF PEFT's
# autocast_adapter_dtype=True), so optimizer updates are not rounded away; "base": the base weight's dtype
# (virtual-token weights stay float32 under both, as PEFT's: passes/_per_site.in_virtual_token_dtype).
ADAPTER_DTYPES = ("float32", "base")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A validated PEFT spec. Build it with `Spec.from_dict` or `Spec.load`."""

    adapters: tuple = ()
    trainable: tuple[str, ...] = ()
    quantize: Any = None
    version: int = SPEC_VERSION
    adapter_dtype: str = "float32"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spec":
        if isinstance(data, Spec):
            return data
        if not isinstance(data, Mapping):
            raise fail("spec", "a mapping with keys 'adapters', 'trainable', 'quantize'", data)
        unknown = [k for k in data if k not in TOP_LEVEL_FIELDS]
        if unknown:
            raise unknown_field("spec", unknown[0], list(TOP_LEVEL_FIELDS))
        version = data.get("version", SPEC_VERSION)
        if type(version) is not int or version != SPEC_VERSION:  # True and 1.0 equal 1, but are not versions
            raise fail("spec.version", f"{SPEC_VERSION} (an integer: the only spec version this peftc reads)", version)
        spec = cls(
            adapters=_parse_adapters(data.get("adapters", [])),
            trainable=optional_pattern_list(data.get("trainable"), "spec.trainable"),
            quantize=_parse_quantize(data.get("quantize")),
            adapter_dtype=one_of(*ADAPTER_DTYPES)(data.get("adapter_dtype", "float32"), "spec.adapter_dtype"),
        )
        if not spec.adapters and not spec.trainable:
            raise SpecError(
                "spec: trains nothing; add an entry to 'adapters' "
                "(e.g. {'method': 'lora', 'targets': ['q_proj', 'v_proj']}) or patterns to 'trainable'"
            )
        return spec

    @classmethod
    def from_peft_config(cls, config: Any) -> "Spec":
        """The spec for an HF PEFT config (a PeftConfig, a dict, or an adapter_config.json path)."""
        return cls.from_dict(spec_dict_from_peft(config))

    def to_peft_config(self) -> dict:
        """This spec as an HF PEFT adapter_config.json dict; SpecError names what PEFT cannot express."""
        return peft_config_from_spec(self)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "adapters": [entry_to_dict(entry) for entry in self.adapters],
            "trainable": list(self.trainable),
            "quantize": None if self.quantize is None else self.quantize.to_dict(),
            "adapter_dtype": self.adapter_dtype,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Spec":
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"spec file {str(path)!r} does not exist")
        return cls.from_dict(_read_spec_file(path))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        elif suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            raise SpecError(f"spec file {str(path)!r}: expected a .json, .yaml or .yml name")
        atomic_write_text(path, text, SpecError)
        return path

    def entry_names(self) -> list[str]:
        """A slot name per adapter entry: the method name, suffixed with the entry index if repeated."""
        counts: dict[str, int] = {}
        for entry in self.adapters:
            counts[entry.method] = counts.get(entry.method, 0) + 1
        return [
            entry.method if counts[entry.method] == 1 else f"{entry.method}{i}"
            for i, entry in enumerate(self.adapters)
        ]


def as_spec(spec: Any) -> Spec:
    """A Spec from a Spec, a dict, or the path of a spec file."""
    if isinstance(spec, Spec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return Spec.load(spec)
    return Spec.from_dict(spec)


def entry_to_dict(entry: Any) -> dict:
    return {"method": entry.method, **dataclass_to_dict(entry)}


def _parse_adapters(value: Any) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise fail("spec.adapters", "a list of method entries", value)
    entries = []
    for i, item in enumerate(value):
        path = f"adapters[{i}]"
        if not isinstance(item, Mapping):
            raise fail(path, "a mapping with a 'method' key", item)
        name = item.get("method")
        if not isinstance(name, str) or name not in METHODS:  # a list or dict is not a name (nor hashable)
            raise fail(f"{path}.method", f"one of {sorted(METHODS)}", name)
        entries.append(parse_dataclass(METHODS[name].config, item, path, skip=("method",)))
    return tuple(entries)


def _parse_quantize(value: Any) -> Any:
    if value is None:
        return None
    if QUANTIZE_CONFIG is None:
        raise SpecError("spec.quantize: quantized bases are not available in this build; expected null")
    return QUANTIZE_CONFIG.from_dict(value, "quantize")


def _read_spec_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise SpecError(f"spec file {str(path)!r}: expected a .json, .yaml or .yml file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SpecError(f"spec file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                        "save it as UTF-8") from err
    import yaml

    try:
        return json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, RecursionError, yaml.YAMLError) as err:  # also a 5000-digit integer, deep nesting
        raise SpecError(f"spec file {str(path)!r} is not valid {suffix[1:].upper()}: "
                        f"{' '.join(str(err).split())[:300]}") from err

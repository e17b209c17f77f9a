"""Field validation for spec dataclasses: every error names the field path and what was expected.

A spec dataclass declares each field's check in `dataclasses.field(metadata={"check": ...})`.
`parse_dataclass` turns a plain dict into the dataclass, refusing unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping

from peftc.errors import SpecError

Check = Callable[[Any, str], Any]  # (value, field path) -> normalized value, or raise SpecError


def fail(path: str, expected: str, value: Any) -> SpecError:
    return SpecError(f"{path}: expected {expected}, got {value!r}")


def positive_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise fail(path, "a positive integer", value)
    return value


def non_negative_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise fail(path, "a non-negative integer", value)
    return value


def finite_number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(path, "a finite number", value)
    return value


def positive_number(value: Any, path: str) -> float:
    finite_number(value, path)
    if value <= 0:
        raise fail(path, "a positive number", value)
    return value


def probability(value: Any, path: str) -> float:
    """A dropout-style probability: 0 <= p < 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise fail(path, "a number in [0, 1)", value)
    return float(value)


def fraction(value: Any, path: str) -> float:
    """A density-style fraction: 0 < f <= 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise fail(path, "a number in (0, 1]", value)
    return float(value)


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise fail(path, "true or false", value)
    return value


def one_of(*choices: Any) -> Check:
    def check(value: Any, path: str) -> Any:
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpecError(f"{path}: expected one of {list(choices)}, got {value!r}{extra}")
        return value

    return check


def optional(check: Check) -> Check:
    def wrapped(value: Any, path: str) -> Any:
        return None if value is None else check(value, path)

    return wrapped


def pattern_list(value: Any, path: str) -> tuple[str, ...]:
    """A non-empty list of target patterns (bare names, globs or "re:" regexes)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise fail(path, "a non-empty list of module names or patterns", value)
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise fail(f"{path}[{i}]", "a non-empty string", item)
        _check_regex(item, f"{path}[{i}]")
    return tuple(value)


def optional_pattern_list(value: Any, path: str) -> tuple[str, ...]:
    if value is None or value == [] or value == ():
        return ()
    return pattern_list(value, path)


def _check_regex(pattern: str, path: str) -> None:
    import re

    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            raise SpecError(f"{path}: invalid regular expression {pattern[3:]!r}: {err}") from err


def check_of(field: dataclasses.Field) -> Check | None:
    return field.metadata.get("check")


def parse_dataclass(cls: type, data: Any, path: str, skip: tuple[str, ...] = ()) -> Any:
    """Build dataclass `cls` from mapping `data`, checking every field; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise fail(path, "a mapping of field names to values", data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = [k for k in data if k not in fields and k not in skip]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), list(fields), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else f"; known fields: {sorted(fields)}"
        raise SpecError(f"{path}.{key}: unknown field{extra}")
    values = {}
    for name, field in fields.items():
        field_path = f"{path}.{name}"
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SpecError(f"{field_path}: required field is missing")
            continue
        check = check_of(field)
        values[name] = check(data[name], field_path) if check else data[name]
    obj = cls(**values)
    validate = getattr(obj, "validate", None)  # constraints across fields: validate(path) raises SpecError
    if validate is not None:
        validate(path)
    return obj


def dataclass_to_dict(obj: Any) -> dict:
    """The inverse of parse_dataclass: plain JSON-able values, tuples as lists."""
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def pattern_map(value_check: Check) -> Check:
    """A mapping from target patterns to values (per-site overrides such as LoRA's rank_pattern)."""

    def check(value: Any, path: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise fail(path, "a mapping from module patterns to values", value)
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key.strip():
                raise fail(f"{path} key", "a non-empty string", key)
            _check_regex(key, f"{path}[{key!r}]")
            out[key] = value_check(item, f"{path}[{key!r}]")
        return out

    return check

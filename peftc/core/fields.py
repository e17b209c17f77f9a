"""Field validation for spec dataclasses: every error names the field path and what was expected.

A spec dataclass declares each field's check in `dataclasses.field(metadata={"check": ...})`.
`parse_dataclass` turns a plain dict into the dataclass, refusing unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Callable, Mapping

from peftc.errors import SpecError

Check = Callable[[Any, str], Any]  # (value, field path) -> normalized value, or raise SpecError


def fail(path: str, expected: str, value: Any) -> SpecError:
    return SpecError(f"{path}: expected {expected}, got {shown(value)}")


def shown(value: Any, limit: int = 200) -> str:
    """`value`'s repr for an error message: one readable line, whatever the value."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        digits = len(str(abs(value))) if abs(value) < 10**4000 else "over 4000"  # str() refuses > 4300 digits
        return f"an integer of {digits} digits"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # a container holding a huge int, or nested too deeply
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


# Sizes (ranks, bottlenecks, token counts, group sizes) above this are a typo, not a model: a rank of
# 2**31 would try to allocate terabytes. Seeds go up to what torch.Generator.manual_seed takes.
MAX_SIZE = 2**20
MAX_SEED = 2**63 - 1


def positive_int(value: Any, path: str) -> int:
    """A size: an integer from 1 to MAX_SIZE (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise fail(path, "a positive integer", value)
    if value > MAX_SIZE:
        raise fail(path, f"a positive integer at most {MAX_SIZE:,} (2**20)", value)
    return value


def non_negative_int(value: Any, path: str) -> int:
    """A seed or count: an integer from 0 to MAX_SEED."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise fail(path, "a non-negative integer below 2**63", value)
    return value


def finite_number(value: Any, path: str) -> float:
    """A number a float holds: an int beyond float range (10**400) is refused, not an OverflowError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(path, "a finite number", value)
    try:
        as_float = float(value)
    except OverflowError:
        raise fail(path, "a finite number (within float range, about 1.8e308)", value) from None
    if not math.isfinite(as_float):
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
    """One of `choices`, of the same type too: 4.0 is not the bit width 4, True is not 1."""

    def check(value: Any, path: str) -> Any:
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            hint = difflib.get_close_matches(shown(value), [str(c) for c in choices], n=1) if isinstance(value, str) else []
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SpecError(f"{path}: expected one of {list(choices)}, got {shown(value)}{extra}")
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
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except (re.error, OverflowError, RecursionError) as err:  # a{99999999999}, deep nesting
            raise SpecError(f"{path}: invalid regular expression {shown(pattern[3:])}: {err}") from err


def check_of(field: dataclasses.Field) -> Check | None:
    return field.metadata.get("check")


def parse_dataclass(cls: type, data: Any, path: str, skip: tuple[str, ...] = ()) -> Any:
    """Build dataclass `cls` from mapping `data`, checking every field; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise fail(path, "a mapping of field names to values", data)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and f.name not in skip}
    unknown = [k for k in data if k not in fields and k not in skip]
    if unknown:
        raise unknown_field(path, unknown[0], list(fields))
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


def unknown_field(path: str, key: Any, known: list[str]) -> SpecError:
    label = key if isinstance(key, str) and len(key) <= 80 and key.isprintable() else shown(key, 80)
    hint = difflib.get_close_matches(label, known, n=1)
    extra = f"; did you mean {hint[0]!r}?" if hint else f"; known fields: {sorted(known)}"
    return SpecError(f"{path}.{label}: unknown field{extra}")


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

"""Module-name patterns, both ways: HF PEFT's target_modules / exclude_modules / rank_pattern keys
and peftc's targets (bare name, glob, or "re:" regex; see peftc.core.targets).

PEFT's rules (peft/tuners/tuners_utils.py, check_target_module_exists):
- a list entry `t` matches a module named `t` or ending in `.t` (t is literal);
- a string is a regex that must fullmatch the module name;
- with layers_to_transform, a list entry also needs the module's first `<layers_pattern>.<index>.`
  segment to hold one of the indices;
- a rank_pattern / alpha_pattern key `k` matches when re.match(rf"(.*\\.)?({k})$", name).
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from peftc.core.targets import GLOB_CHARS
from peftc.errors import SpecError

ANY_PREFIX = r"(?:.*\.)?"  # "", or any module path followed by a dot
PLAIN_NAME = re.compile(r"[A-Za-z0-9_\-]+")
NON_NUMERIC_SEGMENT = r"[^.]*[^0-9.][^.]*"


def is_bare(pattern: str) -> bool:
    return not pattern.startswith("re:") and not (GLOB_CHARS & set(pattern))


def suffix_target(name: str) -> str:
    """peftc target for PEFT's literal "name or .name suffix" rule (a bare name is that rule)."""
    return name if is_bare(name) else "re:" + ANY_PREFIX + re.escape(name)


def targets_from_peft(value: Any, field: str, layers: Any = None, layers_pattern: Any = None) -> list[str]:
    """PEFT target_modules (or exclude_modules) as peftc target patterns."""
    if isinstance(value, str):
        return ["re:" + value]  # PEFT ignores layers_to_transform for a regex
    if not isinstance(value, (list, tuple, set)) or not value:
        raise SpecError(f"{field}: expected a list of module names or a regex string, got {value!r}")
    names = sorted(set(value))  # PEFT keeps target_modules as a set: its saved order means nothing
    if layers is None or layers == []:
        return [suffix_target(name) for name in names]
    # One pattern: PEFT accepts a name that no selected layer holds, so each name need not match.
    return [_layered_target(names, layers, layers_pattern)]


def _layered_target(names: list[str], layers: Any, layers_pattern: Any) -> str:
    """A regex for "one of names, inside one of these layer indices" (the first numbered segment, as PEFT)."""
    indices = [layers] if isinstance(layers, int) else list(layers)
    index = "(?:" + "|".join(str(int(i)) for i in indices) + ")"
    if layers_pattern:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        layer = rf"(?:{NON_NUMERIC_SEGMENT}\.)*(?:{'|'.join(patterns)})\.{index}\."
    else:
        layer = rf"(?:{NON_NUMERIC_SEGMENT}\.){{2,}}{index}\."
    return "re:" + layer + ANY_PREFIX + "(?:" + "|".join(re.escape(n) for n in names) + ")"


def targets_to_peft(patterns: tuple, field: str) -> Any:
    """peftc target patterns as PEFT target_modules: a list of names when every pattern is bare,
    otherwise one regex PEFT fullmatches against module names."""
    if not patterns:
        return None
    if all(is_bare(p) for p in patterns):
        return list(patterns)
    return "|".join(f"(?:{pattern_regex(p)})" for p in patterns)


def pattern_regex(pattern: str) -> str:
    """A regex that fullmatches the same module paths as one peftc pattern."""
    if pattern.startswith("re:"):
        return pattern[3:]
    if GLOB_CHARS & set(pattern):
        return fnmatch.translate(pattern)
    return ANY_PREFIX + re.escape(pattern)


def pattern_key_from_peft(key: str) -> str:
    """A rank_pattern / alpha_pattern key as a peftc pattern."""
    return key if PLAIN_NAME.fullmatch(key) else f"re:{ANY_PREFIX}(?:{key})"


def pattern_key_to_peft(pattern: str) -> str:
    """A peftc pattern as a rank_pattern / alpha_pattern key with the same matches under PEFT's rule."""
    if is_bare(pattern):
        return re.escape(pattern)  # PEFT's keys are regexes: a literal "." must not match any character
    wrapped = re.fullmatch(re.escape("re:" + ANY_PREFIX) + r"\(\?:(.*)\)", pattern)
    if wrapped:
        return wrapped.group(1)  # what pattern_key_from_peft made
    # "^" anchors the key at the start: PEFT's optional "(.*\.)?" prefix can then only be empty.
    return f"^(?:{pattern_regex(pattern)})"


def save_exclusion(name: str) -> str:
    """PEFT never adapts a module inside a modules_to_save module: the matching exclude pattern."""
    return f"re:{ANY_PREFIX}(?:{name})(?:\\..*)?"


def save_target(name: str) -> str:
    """PEFT's modules_to_save rule: a module whose name ends with `name` (plain endswith)."""
    return "re:.*" + re.escape(name)


def save_name(pattern: str, field: str) -> str:
    """The modules_to_save entry for a copy target, if PEFT can express it."""
    if is_bare(pattern):
        return pattern
    literal = re.fullmatch(r"re:\.\*((?:\\.|[A-Za-z0-9_])+)", pattern)
    if literal:
        return re.sub(r"\\(.)", r"\1", literal.group(1))
    raise SpecError(f"{field}: {pattern!r} cannot be a PEFT modules_to_save entry (a module name suffix); "
                    "use bare module names")

"""Target patterns: which module paths (or parameter names) a spec entry means.

- a bare name ("q_proj", "to_out.0") matches paths that end with its components, as PEFT's
  target_modules entries do: "to_out.0" matches "...attn1.to_out.0", never "...xto_out.0";
- a pattern with `*`, `?` or `[` is a glob over the whole path;
- "re:<regex>" is a full-match regular expression.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable

from peftc.errors import SpecError

GLOB_CHARS = set("*?[")


def matches(pattern: str, path: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if GLOB_CHARS & set(pattern):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


def matches_any(patterns: Iterable[str], path: str) -> bool:
    return any(matches(p, path) for p in patterns)


def select(patterns: Iterable[str], paths: Iterable[str], field: str, what: str = "module path") -> list[str]:
    """Paths matched by any pattern; a pattern that matches nothing is a SpecError with suggestions."""
    paths = list(paths)
    chosen: list[str] = []
    for i, pattern in enumerate(patterns):
        hits = [p for p in paths if matches(pattern, p)]
        if not hits:
            raise SpecError(f"{field}[{i}]: {pattern!r} matches no {what}; {nearest_hint(pattern, paths)}")
        chosen.extend(h for h in hits if h not in chosen)
    return [p for p in paths if p in chosen]  # graph order


def nearest_hint(pattern: str, paths: list[str]) -> str:
    if not paths:
        return "the model has none that this entry can act on"
    key = pattern[3:] if pattern.startswith("re:") else pattern
    by_leaf: dict[str, str] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], p)  # the first layer's path stands for its leaf
    near = difflib.get_close_matches(key, list(by_leaf), n=3, cutoff=0.5)
    near_paths = [by_leaf[n] for n in near]
    near_paths += [p for p in difflib.get_close_matches(key, paths, n=3, cutoff=0.3) if p not in near_paths]
    if not near_paths:
        near_paths = paths[:3]
    return "nearest: " + ", ".join(repr(p) for p in near_paths[:5])

"""Module paths folded for people: `model.layers.{0..31}.self_attn.q_proj` instead of 32 lines."""

from __future__ import annotations

import re


def group_paths(paths: list[str]) -> list[tuple[str, list[str]]]:
    """Fold numbered layers: model.layers.{0..31}.self_attn.q_proj, in first-seen order."""
    groups: dict[str, list[str]] = {}
    numbers: dict[str, list[int]] = {}
    for path in paths:
        match = re.search(r"\.(\d+)\.", "." + path + ".")
        if match is None:
            groups.setdefault(path, []).append(path)
            continue
        padded = "." + path + "."
        key = (padded[: match.start() + 1] + "{}" + padded[match.end() - 1:]).strip(".")
        groups.setdefault(key, []).append(path)
        numbers.setdefault(key, []).append(int(match.group(1)))
    out = []
    for key, members in groups.items():
        if key in numbers:
            nums = sorted(set(numbers[key]))
            span = f"{nums[0]}..{nums[-1]}" if nums == list(range(nums[0], nums[-1] + 1)) else ",".join(map(str, nums))
            label = key.replace("{}", "{" + span + "}") if len(nums) > 1 else key.replace("{}", str(nums[0]))
        else:
            label = key
        out.append((label, members))
    return out

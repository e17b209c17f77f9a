"""The fields low-rank methods share (targets, r, alpha, dropout, exclude) and their scale alpha/r."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftc.core.fields import (
    optional_pattern_list,
    pattern_list,
    positive_int,
    positive_number,
    probability,
)


@dataclass(frozen=True)
class LowRankConfig:
    targets: tuple = field(metadata={"check": pattern_list})
    r: int = field(default=8, metadata={"check": positive_int})
    alpha: float = field(default=8, metadata={"check": positive_number})
    dropout: float = field(default=0.0, metadata={"check": probability})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})

    @property
    def scale(self) -> float:
        return self.alpha / self.r

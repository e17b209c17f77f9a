"""Compile without some of a plan's steps: the reference a pass's equality tests compare with."""

from __future__ import annotations

import contextlib

from peftc.compiler.plan import Plan


@contextlib.contextmanager
def without_steps(*names: str):
    """peftc.compile (and every graph built meanwhile) with Plan.steps minus the steps named."""
    real = Plan.steps
    Plan.steps = lambda self, spec, *more: [s for s in real(self, spec, *more) if s.name not in names]
    try:
        yield
    finally:
        Plan.steps = real

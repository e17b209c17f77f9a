"""Shared benchmark helpers: alternate the contenders, take medians, report ratios."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}".strip()


def llama_config(**overrides):
    from transformers import LlamaConfig

    base = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=4000, max_position_embeddings=512)
    base.update(overrides)
    return LlamaConfig(**base)


def alternate(contenders: dict[str, Callable[[], None]], repeats: int, warmup: int = 2,
              clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per contender, running them in turn so drift hits all of them alike.

    `clock=time.process_time` counts this process's CPU time instead of wall time: on a machine
    shared with other jobs it is much less noisy (it still counts contention for caches)."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}

"""DDP over a compiled model on 2 gloo processes: the same training as one process on the whole batch."""

from __future__ import annotations

import copy

import pytest
from torch.nn.parallel import DistributedDataParallel

from distributed_harness import run_on_ranks
from distributed_lora import (
    STEPS,
    assert_identical_across_ranks,
    assert_matches_single_process,
    compiled_llama,
    single_process_run,
    train,
)

pytestmark = pytest.mark.distributed


def ddp_training(rank: int, world_size: int, steps: int) -> dict:
    """Without and with activation checkpointing, in the same two processes (one process start for both), each
    on its own deepcopy of one compile (a compile is seconds of torch.export per rank; a deepcopy runs none)."""
    compiled = compiled_llama()
    runs = {}
    for checkpointing in (False, True):
        cm = copy.deepcopy(compiled)
        if checkpointing:
            cm.gradient_checkpointing_enable()
        ddp = DistributedDataParallel(cm)
        assert ddp.module is cm
        runs[checkpointing] = train(ddp, rank, world_size, steps) | {"checkpointing": cm.is_gradient_checkpointing}
    return runs


def test_ddp_trains_lora_as_one_process_on_the_whole_batch_with_and_without_checkpointing():
    runs = run_on_ranks(ddp_training, world_size=2, timeout=150, steps=STEPS)
    _, reference = single_process_run()
    for checkpointing in (False, True):
        results = [run[checkpointing] for run in runs]
        assert all(result["checkpointing"] == checkpointing for result in results)
        assert_identical_across_ranks(results)
        assert_matches_single_process(results, reference)

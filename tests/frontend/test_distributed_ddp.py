"""DDP over a compiled model on 2 gloo processes: the same training as one process on the whole batch."""

from __future__ import annotations

import pytest
from torch.nn.parallel import DistributedDataParallel

from distributed_harness import run_on_ranks
from distributed_lora import (
    STEPS,
    assert_identical_across_ranks,
    assert_matches_single_process,
    compiled_llama,
    train,
)

pytestmark = pytest.mark.distributed


def ddp_training(rank: int, world_size: int, steps: int) -> dict:
    cm = compiled_llama()
    ddp = DistributedDataParallel(cm)
    assert ddp.module is cm
    return train(ddp, rank, world_size, steps)


def test_ddp_trains_lora_as_one_process_on_the_whole_batch():
    results = run_on_ranks(ddp_training, world_size=2, timeout=120, steps=STEPS)
    reference = train(compiled_llama(), steps=STEPS)
    assert_identical_across_ranks(results)
    assert_matches_single_process(results, reference)

"""examples/train_fsdp2.py under torchrun on 2 CPU processes: it trains, shards, and saves a whole adapter."""

from __future__ import annotations

import re
import sys

import pytest
from safetensors.torch import load_file

from distributed_harness import REPO, free_port, run_command

pytestmark = pytest.mark.distributed


def torchrun_example(out_dir, *flags: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               str(REPO / "examples" / "train_fsdp2.py"), "--steps", "6", "--layers", "2", "--out", str(out_dir), *flags]
    return run_command(command, timeout=150, env={"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})


def test_the_fsdp2_example_trains_under_torchrun_on_two_processes(tmp_path):
    """With --checkpointing: the whole recipe (per-layer sharding, recomputation in backward, the sharded save)."""
    output = torchrun_example(tmp_path / "adapter", "--checkpointing")
    summary = re.search(r"2 ranks, CPU, checkpointing (on|off): each rank holds ([\d,]+) of ([\d,]+) parameter bytes "
                        r".*loss ([\d.]+) -> ([\d.]+)", output)
    assert summary, output
    checkpointing, held, whole, first, last = summary.groups()
    assert checkpointing == "on"
    held, whole = int(held.replace(",", "")), int(whole.replace(",", ""))
    assert 0.45 * whole <= held <= 0.55 * whole  # about half of every parameter on each of the 2 ranks
    assert float(last) < float(first)
    tensors = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert len(tensors) == 2 * 4 * 2  # 2 layers x 4 projections x (A, B), whole tensors
    for name, tensor in tensors.items():  # r = 8, hidden 64, 2 key/value heads of 16
        assert tensor.shape == (8, 64) if name.endswith(".A") else tensor.shape[1:] == (8,), (name, tensor.shape)

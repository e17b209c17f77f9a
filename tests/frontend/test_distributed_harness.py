"""The multi-process harness itself: ranks meet over gloo, a failing rank's traceback comes back, every run ends."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from distributed_harness import RankFailure, free_port, run_on_ranks

pytestmark = pytest.mark.distributed


def sum_of_ranks(rank: int, world_size: int, scale: float) -> dict:
    value = torch.tensor([float(rank)])
    dist.all_reduce(value)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": value.item() * scale}


def second_rank_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("rank one was told to fail")
    dist.barrier()  # rank 0 would wait here for ever: the harness must end it


def never_returns(rank: int, world_size: int) -> None:
    time.sleep(600)


def test_ranks_join_one_gloo_group_and_return_their_results():
    results = run_on_ranks(sum_of_ranks, world_size=2, timeout=60, scale=2.0)
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 2.0 for r in results)  # (0 + 1) * 2 on each rank


def test_a_failing_rank_reports_its_traceback_and_the_waiting_rank_is_ended():
    start = time.monotonic()
    with pytest.raises(RankFailure) as caught:
        run_on_ranks(second_rank_raises, world_size=2, timeout=60)
    message = str(caught.value)
    assert "process 1 exited with 1" in message
    rank_one = message.split("----- rank 1 (exit 1) -----")[1]
    assert "Traceback" in rank_one and "ValueError: rank one was told to fail" in rank_one
    assert "in second_rank_raises" in rank_one
    assert time.monotonic() - start < 60  # ended by the failure, not by the timeout


def test_a_run_past_its_timeout_is_killed():
    start = time.monotonic()
    with pytest.raises(RankFailure, match="timed out after 3 s"):  # the ranks sleep for 600 s
        run_on_ranks(never_returns, world_size=2, timeout=3)
    assert time.monotonic() - start < 60  # killed at the timeout, not left to run


def test_free_port_can_be_bound_on_loopback():
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert 0 < port < 65536

"""Start a base process and user processes on this machine, joined by torch.distributed (gloo, 127.0.0.1).

    results = run_ranks([serve, train_a, train_b], timeout_s=60)   # rank i runs fns[i](rank, *args)

Each function is importable (spawned processes import it by name) and returns something
picklable. Every process is joined by the deadline, or terminated; a failure in any rank
raises LinkError with that rank's traceback. torchrun works as well (see
examples/partition_server_user.py): it sets the rendezvous environment instead.
"""

from __future__ import annotations

import socket
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from peftc.errors import LinkError
from peftc.partitioning.distributed import init_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, timeout_s: float, fn, args: tuple, results) -> None:
    try:
        init_process_group(rank, world, port, timeout_s)
        results.put((rank, "ok", fn(rank, *args)))
    except BaseException:  # noqa: BLE001 — reported (before the group closes) to the parent, which raises it
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fns: list, args: tuple = (), timeout_s: float = 60.0) -> list:
    """Run fns[rank](rank, *args) in len(fns) processes; their results by rank."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(rank, len(fns), port, timeout_s, fn, args, results),
                                 daemon=True) for rank, fn in enumerate(fns)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    outcomes: dict[int, tuple] = {}
    first_failure = None  # the rank whose error arrived first: the others often fail because it did
    try:
        while len(outcomes) < len(fns) and time.monotonic() < deadline:
            try:
                rank, status, value = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except Exception:  # noqa: BLE001 — queue.Empty: look again until the deadline
                if any(p.exitcode not in (None, 0) for p in processes) and results.empty():
                    time.sleep(0.5)  # a rank died; give the others' reports a moment, then stop waiting
                    if results.empty():
                        break
                continue
            outcomes[rank] = (status, value)
            if status == "error":
                first_failure = rank
                break
    finally:
        for process in processes:
            process.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
    if first_failure is not None:
        raise LinkError(f"rank {first_failure} failed:\n{outcomes[first_failure][1]}")
    missing = [r for r in range(len(fns)) if r not in outcomes]
    if missing:
        codes = {r: processes[r].exitcode for r in missing}
        raise LinkError(f"ranks {missing} did not finish within {timeout_s:.0f} s (exit codes {codes}); "
                        "they were terminated")
    return [outcomes[r][1] for r in range(len(fns))]

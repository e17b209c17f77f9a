"""Run a test function on several processes joined by gloo on 127.0.0.1, as torchrun would.

    results = run_on_ranks(worker, world_size=2, timeout=60, steps=3)

`worker(rank, world_size, **kwargs)` is a module-level function of an importable test module;
each rank is a fresh Python process (`python distributed_harness.py`) with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port),
a gloo process group already initialized, and one thread. What each rank returns comes back
(through torch.save) as `results[rank]`.

Every run ends: a rank that fails has its traceback raised in the parent as RankFailure, and
the other ranks (often blocked in a collective waiting for it) are killed after a short grace;
a run past `timeout` is killed whole and raises with every rank's output so far.
`run_command` does the same for one command line (torchrun itself).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRACE_S = 5.0  # how long the other ranks may take to notice a failed one before they are killed
TAIL_CHARS = 6000


class RankFailure(AssertionError):
    """A rank raised, died, or the run went past its timeout; the message holds each rank's output."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets, plus one thread per process (the ranks share a few cores)."""
    path = os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": path}


def run_on_ranks(worker, world_size: int = 2, timeout: float = 120.0, **kwargs) -> list:
    """Run `worker(rank, world_size, **kwargs)` on `world_size` processes; their return values, by rank."""
    module = sys.modules[worker.__module__]
    target = f"{Path(module.__file__).resolve()}:{worker.__qualname__}"
    with tempfile.TemporaryDirectory(prefix="peftc-ranks-") as tmp:
        tmp = Path(tmp)
        torch.save(kwargs, tmp / "kwargs.pt")
        port = free_port()
        commands = [[sys.executable, str(Path(__file__).resolve()), target, str(tmp)] for _ in range(world_size)]
        envs = [rank_environment(rank, world_size, port) for rank in range(world_size)]
        _run_processes(commands, envs, tmp, timeout, label="rank")
        return [torch.load(tmp / f"result{rank}.pt", weights_only=False) for rank in range(world_size)]


def run_command(command: list[str], timeout: float = 120.0, env: dict | None = None) -> str:
    """Run one command line (torchrun ...) to completion or kill its whole process group; its output."""
    with tempfile.TemporaryDirectory(prefix="peftc-cmd-") as tmp:
        tmp = Path(tmp)
        _run_processes([command], [{**os.environ, **(env or {})}], tmp, timeout, label="command")
        return (tmp / "out0.txt").read_text(errors="replace")


def _run_processes(commands, envs, tmp: Path, timeout: float, label: str) -> None:
    processes = []
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(open(tmp / f"out{i}.txt", "wb")) for i in range(len(commands))]
        stack.callback(lambda: [_kill(process) for process in processes])  # however it ends; before the logs close
        for command, env, log in zip(commands, envs, logs):
            # A session of its own per process, so killing it also kills what it started.
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              cwd=REPO, start_new_session=True))
        problem = _wait_all(processes, time.monotonic() + timeout, timeout)
    if problem:
        outputs = "\n".join(f"----- {label} {i} (exit {p.returncode}) -----\n{_tail(tmp / f'out{i}.txt')}"
                            for i, p in enumerate(processes))
        raise RankFailure(f"{problem}\n{outputs}")


def _wait_all(processes, deadline: float, timeout: float) -> str | None:
    """None once every process exited 0; else what went wrong (first failure, or the timeout)."""
    while True:
        codes = [p.poll() for p in processes]
        if any(code not in (None, 0) for code in codes):
            _wait_until(processes, time.monotonic() + GRACE_S)  # the others often fail too: show all
            codes = [p.poll() for p in processes]
            return "failed: " + ", ".join(f"process {i} exited with {code}" for i, code in enumerate(codes)
                                          if code not in (None, 0))
        if all(code == 0 for code in codes):
            return None
        if time.monotonic() > deadline:
            return f"timed out after {timeout:.0f} s (exit codes so far: {codes})"
        time.sleep(0.05)


def _wait_until(processes, deadline: float) -> None:
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(0.05)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text if len(text) <= TAIL_CHARS else "...\n" + text[-TAIL_CHARS:]


def _load(target: str):
    """`/path/to/test_module.py:function` -> the function, importing the module by its file's name."""
    file, name = target.rsplit(":", 1)
    sys.path.insert(0, str(Path(file).parent))
    return getattr(importlib.import_module(Path(file).stem), name)


def _rank_main(target: str, tmp: str) -> None:
    import torch.distributed as dist

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        worker = _load(target)
        kwargs = torch.load(Path(tmp) / "kwargs.pt", weights_only=False)
        torch.manual_seed(0)
        result = worker(rank, world_size, **kwargs)
        torch.save(result, Path(tmp) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        _rank_main(*sys.argv[1:3])
    except BaseException:  # noqa: BLE001 - any failure of a rank, reported with its traceback
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # not sys.exit: a thread blocked in a collective must not keep the process alive
    sys.stdout.flush()

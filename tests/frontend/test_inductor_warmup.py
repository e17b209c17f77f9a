"""backend="inductor" starts Inductor's CPU vector-ISA probes beside the capture, side by side, once."""

from __future__ import annotations

import threading

from peftc.ir import inductor_warmup


class FakeIsa:
    """Stands in for an ISA: bool() is the probe; each waits for the others, so a serial run breaks."""

    def __init__(self, name: str, barrier: threading.Barrier, seen: list):
        self.name, self.barrier, self.seen = name, barrier, seen

    def __bool__(self) -> bool:
        self.barrier.wait()  # raises BrokenBarrierError (and records nothing) unless all run at once
        self.seen.append((self.name, threading.current_thread() is not threading.main_thread()))
        return True


def test_probes_run_side_by_side_off_the_main_thread_and_only_once(monkeypatch):
    seen: list = []
    barrier = threading.Barrier(3, timeout=30)
    fakes = [FakeIsa(name, barrier, seen) for name in ("avx512_vnni", "avx512", "avx2")]
    monkeypatch.setattr(inductor_warmup, "_candidates", lambda _module: fakes)
    monkeypatch.setattr(inductor_warmup, "_probes", [])
    inductor_warmup.start_cpu_probes()
    inductor_warmup.start_cpu_probes()  # a second compile in the same process probes nothing again
    inductor_warmup.wait_for_probes()
    assert sorted(seen) == [("avx2", True), ("avx512", True), ("avx512_vnni", True)]

"""Inductor's one-time CPU start-up work, begun while the model is still being captured.

Before it generates its first C++ kernel, Inductor finds which vector instruction sets this CPU
can build and load (`torch._inductor.cpu_vec_isa.valid_vec_isa_list`): one g++ build of a probe
program and one Python process that loads it, per candidate set, one after another, on the
critical path of the first compiled call (about a fifth of backend="inductor"'s cold first step,
measured in benchmarks/RESULTS.md). The work is subprocesses, so threads run the probes side by
side while the capture (torch.export, one core) runs in the main thread; peftc.compile joins them
before it returns (no thread left running when the user forks), and Inductor's first compile then
finds every answer in its own cache.

Best effort: if torch's internals change, the warm-up does nothing and Inductor probes as it did.
"""

from __future__ import annotations

import platform
import threading

_probes: list[threading.Thread] = []


def start_cpu_probes() -> None:
    """Run Inductor's vector-ISA probes in background threads (once per process)."""
    if _probes:
        return
    try:  # imported here: torch._inductor is heavy, and only backend="inductor" needs it
        from torch._inductor import cpu_vec_isa
        candidates = _candidates(cpu_vec_isa)
    except (ImportError, AttributeError, OSError):
        return
    for isa in candidates:  # bool(isa) builds and loads the probe; the answer is cached on the ISA object
        thread = threading.Thread(target=bool, args=(isa,), name=f"peftc-isa-probe-{isa}", daemon=True)
        thread.start()
        _probes.append(thread)


def _candidates(cpu_vec_isa) -> list:
    """The ISAs valid_vec_isa_list would probe on this machine (x86 only: elsewhere it probes none or one)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    flags = cpu_vec_isa.x86_isa_checker()
    return [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]


def wait_for_probes() -> None:
    """Block until the probes started by start_cpu_probes have answered (at once if none were started)."""
    for thread in _probes:
        thread.join()

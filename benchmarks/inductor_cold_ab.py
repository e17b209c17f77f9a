"""Cold backend="inductor" of two peftc checkouts, alternated in fresh processes (empty Inductor caches).

    python benchmarks/inductor_cold_ab.py --repeats 3 NAME=PYTHON:BENCHMARKS_DIR [NAME=PYTHON:BENCHMARKS_DIR ...]

e.g. `main=/work/main/.venv/bin/python:/work/main/benchmarks branch=.venv/bin/python:benchmarks`. Each
sample runs that checkout's `inductor.py --cold-one peftc_inductor` (set-up + first training step) with
its own interpreter, so each side imports its own peftc; prints wall and process-tree CPU with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import tempfile


def sample(python: str, cwd: str, contender: str, layers: int) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        out = subprocess.run([python, "inductor.py", "--cold-one", contender, "--layers", str(layers)], env=env,
                             cwd=cwd, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["tree_cpu"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result["load"] = os.getloadavg()[0]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sides", nargs="+", help="NAME=PYTHON:BENCHMARKS_DIR")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contender", default="peftc_inductor")
    args = parser.parse_args()
    sides = {name: where.split(":", 1) for name, where in (s.split("=", 1) for s in args.sides)}
    samples: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, (python, cwd) in sides.items():
            samples[name].append(sample(python, cwd, args.contender, args.layers))
            print(name, {k: round(v, 2) for k, v in samples[name][-1].items()}, flush=True)
    for name, runs in samples.items():
        print(f"median {name}: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in runs[0]))


if __name__ == "__main__":
    main()

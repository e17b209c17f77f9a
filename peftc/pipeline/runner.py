"""The pass pipeline: run rewrite passes in order, check the graph after each, keep records.

A pass is `verb_noun(gm, ctx) -> PassResult`. After each pass the pipeline runs
`graph.lint()` and peftc's invariants, optionally dumps the code, and keeps a `PassRecord`
(time, sites touched, parameters added, the nodes it erased or rewired, as text) from which
`report()` and `diff()` are built. The graph's code is regenerated once, after the last pass
(after each pass when dumping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.fx import GraphModule

from peftc.pipeline import invariants
from peftc.pipeline.changes import ChangeWatch
from peftc.ir.sites import Site


@dataclass
class PassResult:
    modified: bool
    sites: list[str] = field(default_factory=list)
    params_added: dict[str, int] = field(default_factory=dict)  # tensor name -> element count
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PassRecord:
    index: int
    name: str
    entry_index: int | None  # spec.adapters index for method passes
    method: str | None
    seconds: float
    modified: bool
    sites: tuple[str, ...]
    params_added: dict
    notes: tuple[str, ...]
    nodes_before: int
    nodes_after: int
    erased: tuple = ()  # graph_changes.NodeText of each node the pass removed, as it read before
    rewired: tuple = ()  # NodeText of each node whose inputs the pass changed, as it read before


@dataclass
class PassContext:
    """What passes read and share: the spec, the sites, the adapter tree, the current entry."""

    spec: Any
    sites: list[Site]
    adapter_root: nn.Module
    base_params: dict[str, nn.Parameter]  # the user's parameters, by FQN, shared with the graph
    trainable: set[str] = field(default_factory=set)  # base FQNs the spec unfreezes
    entry: Any = None
    entry_index: int | None = None
    slot: str | None = None
    frozen: bool = False  # set once freeze_params has run
    state: dict = field(default_factory=dict)  # per-compile data passes hand to later passes and graphs
    graph_cache: dict = field(default_factory=dict)  # per-graph scratch (fake-tensor metadata of this capture)

    def sites_by_path(self) -> dict[str, list[Site]]:
        out: dict[str, list[Site]] = {}
        for site in self.sites:
            out.setdefault(site.path, []).append(site)
        return out


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[GraphModule, PassContext], PassResult]
    entry_index: int | None = None


def run_pipeline(gm: GraphModule, steps: list[Step], ctx: PassContext, dump_dir: Path | None = None) -> list[PassRecord]:
    snapshot = invariants.snapshot_base(ctx.base_params)
    if dump_dir is not None:
        _dump(gm, dump_dir, 0, "capture")
    records = []
    for index, step in enumerate(steps, start=1):
        _enter_entry(ctx, step)
        nodes_before = len(gm.graph.nodes)
        watch = ChangeWatch(gm)  # outside the timing: a pass is timed alone
        start = time.perf_counter()
        result = step.run(gm, ctx)
        gm.graph.lint()
        if dump_dir is not None:  # the dump shows each pass's code; otherwise regenerate once, below
            gm.recompile()
        seconds = time.perf_counter() - start
        invariants.check_all(gm, ctx, snapshot, step.name)
        records.append(PassRecord(
            index=index, name=step.name, entry_index=step.entry_index,
            method=None if ctx.entry is None else ctx.entry.method, seconds=seconds,
            modified=result.modified, sites=tuple(result.sites), params_added=dict(result.params_added),
            notes=tuple(result.notes), nodes_before=nodes_before, nodes_after=len(gm.graph.nodes),
            erased=watch.erased(gm), rewired=watch.rewired(gm),
        ))
        if dump_dir is not None:
            _dump(gm, dump_dir, index, step.name)
    _enter_entry(ctx, Step("done", lambda gm, ctx: None))
    gm.recompile()
    return records


def _enter_entry(ctx: PassContext, step: Step) -> None:
    if step.entry_index is None:
        ctx.entry, ctx.entry_index, ctx.slot = None, None, None
    else:
        ctx.entry = ctx.spec.adapters[step.entry_index]
        ctx.entry_index = step.entry_index
        ctx.slot = ctx.spec.entry_names()[step.entry_index]


def _dump(gm: GraphModule, dump_dir: Path, index: int, name: str) -> None:
    dump_dir.mkdir(parents=True, exist_ok=True)
    (dump_dir / f"{index:02d}-{name}.py").write_text(gm.code)

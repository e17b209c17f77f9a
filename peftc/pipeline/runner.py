"""The pass pipeline: run rewrite passes in order, check the graph after each, keep records.

A pass is `verb_noun(gm, ctx) -> PassResult`. After each pass the pipeline runs
`graph.lint()` and peftc's invariants, optionally dumps the code, and keeps a `PassRecord`
(time, sites touched, parameters added, the nodes it erased or rewired, as text) from which
`report()` and `diff()` are built. The graph's code is regenerated once, after the last pass
(after each pass when dumping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn
from torch.fx import GraphModule

from peftc.ir.sites import Site
from peftc.pipeline import invariants
from peftc.pipeline.changes import ChangeWatch
from peftc.pipeline.state import MergeState, SharedState


@dataclass
class PassResult:
    modified: bool
    sites: list[str] = field(default_factory=list)
    params_added: dict[str, int] = field(default_factory=dict)  # tensor name -> element count
    notes: list[str] = field(default_factory=list)
    # Sites whose op the pass replaced (quantize_base): old op node name -> the site as it now reads.
    # The runner hands the updated sites to later steps; no pass edits a list another one owns.
    replaced_sites: dict[str, Site] = field(default_factory=dict)


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
    erased: tuple = ()  # changes.NodeText of each node the pass removed, as it read before
    rewired: tuple = ()  # NodeText of each node whose inputs the pass changed, as it read before


@dataclass(frozen=True)
class PassContext:
    """What one step reads: the spec and its own entry, the sites, the adapter tree, the shared state.

    The runner makes a new context per step (`for_step`); passes never write to it.
    """

    spec: Any
    sites: tuple[Site, ...]
    adapter_root: nn.Module
    base_params: dict[str, nn.Parameter]  # the user's parameters, by FQN, shared with the graph
    trainable: frozenset[str]  # base FQNs the spec unfreezes (resolved before any pass runs)
    methods: Mapping[str, Any]  # the method table, handed in: passes never import the spec layer
    shared: SharedState = field(default_factory=SharedState)  # per compile: quantize_base's packed weights
    merge: MergeState | None = None  # set for a merged plan
    serving: Any = None  # the ServingPlan of a serving plan (peftc.ir.lora_bank)
    entry: Any = None  # this step's spec entry (method passes)
    entry_index: int | None = None
    slot: str | None = None  # the entry's adapter slot name: "lora", or "lora0", "lora1" if repeated
    meta_cache: dict = field(default_factory=dict)  # per graph: fake-tensor metadata (graph_edit.Inserter)

    def for_step(self, step: "Step", sites: tuple[Site, ...]) -> "PassContext":
        if step.entry_index is None:
            return replace(self, sites=sites, entry=None, entry_index=None, slot=None)
        return replace(self, sites=sites, entry=self.spec.adapters[step.entry_index], entry_index=step.entry_index,
                       slot=self.spec.entry_names()[step.entry_index])

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
    freezes: bool = False  # from this step on, frozen base parameters must stay frozen (an invariant)


def run_pipeline(gm: GraphModule, steps: list[Step], ctx: PassContext,
                 dump_dir: Path | None = None) -> tuple[list[PassRecord], tuple[Site, ...]]:
    """Run `steps` on `gm`; return their records and the sites as the last step left them."""
    snapshot = invariants.snapshot_base(ctx.base_params)
    if dump_dir is not None:
        _dump(gm, dump_dir, 0, "capture")
    records = []
    sites = tuple(ctx.sites)
    frozen = False
    for index, step in enumerate(steps, start=1):
        step_ctx = ctx.for_step(step, sites)
        nodes_before = len(gm.graph.nodes)
        watch = ChangeWatch(gm)  # outside the timing: a pass is timed alone
        start = time.perf_counter()
        result = step.run(gm, step_ctx)
        gm.graph.lint()
        if dump_dir is not None:  # the dump shows each pass's code; otherwise regenerate once, below
            gm.recompile()
        seconds = time.perf_counter() - start
        frozen = frozen or step.freezes
        invariants.check_all(gm, step_ctx, snapshot, step.name, frozen=frozen)
        sites = tuple(result.replaced_sites.get(site.node_name, site) for site in sites)
        records.append(PassRecord(
            index=index, name=step.name, entry_index=step.entry_index,
            method=None if step_ctx.entry is None else step_ctx.entry.method, seconds=seconds,
            modified=result.modified, sites=tuple(result.sites), params_added=dict(result.params_added),
            notes=tuple(result.notes), nodes_before=nodes_before, nodes_after=len(gm.graph.nodes),
            erased=watch.erased(gm), rewired=watch.rewired(gm),
        ))
        if dump_dir is not None:
            _dump(gm, dump_dir, index, step.name)
    gm.recompile()
    return records, sites


def _dump(gm: GraphModule, dump_dir: Path, index: int, name: str) -> None:
    dump_dir.mkdir(parents=True, exist_ok=True)
    (dump_dir / f"{index:02d}-{name}.py").write_text(gm.code)

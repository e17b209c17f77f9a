"""The first build of a compiled model: one capture that also serves the call signatures to come.

For a transformers model the first capture is of the superset call (peftc.capture.superset):
the example call plus labels, num_items_in_batch (what Trainer passes), the output flags and
the inputs with a checked default (position_ids). The example call's own graph is derived from it (peftc.capture.specialize), and so is the graph of any later
call that passes a subset of those inputs, so meeting such a call costs a graph copy, not a capture.
A causal LM's superset is traced with a cache that marks where each layer writes its keys and values
(peftc.capture.cache_points), so cached forward calls derive their graph from it as well
(peftc.runtime.cache_derivation); the graphs themselves are the same as without the marks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.fx import GraphModule

from peftc.capture.cache_points import WithCachePoints, marks_cache
from peftc.capture.calls import CallSignature
from peftc.capture.specialize import derive_graph
from peftc.capture.superset import ExtraInputs, superset_calls, superset_quiet
from peftc.compiler.compilation import Built, Compilation
from peftc.compiler.plan import Plan
from peftc.errors import CaptureError
from peftc.ir.lora_bank import ServingPlan
from peftc.pipeline.runner import PassRecord
from peftc.spec.methods import METHODS
from peftc.spec.parse import Spec

POSITION_FREE_ADDITIVE = ("adapter", "ia3")  # additive methods on linear ops: the sequence is untouched


@dataclass(frozen=True)
class FirstBuild:
    built: Built  # the graph of the example call
    superset: tuple[tuple, dict] | None = None  # the call captured, when it is not the example call
    superset_graph: GraphModule | None = None
    superset_flat: GraphModule | None = None  # that graph as the passes left it (cached calls derive from it)

    def superset_parts(self) -> tuple[tuple[tuple, dict], GraphModule, GraphModule] | None:
        """(call, graph, flat graph) of the superset, as a dispatching model takes them; None without one."""
        return (self.superset, self.superset_graph, self.superset_flat) if self.superset is not None else None


def build_first(compilation: Compilation, example: tuple[tuple, dict], plan: Plan, *,
                dynamic_shapes: Any = None, dump_dir: Path | None = None,
                superset: tuple[tuple, dict] | None = None) -> FirstBuild:
    """Capture the superset call and derive the example call's graph from it; capture the example call
    itself when there is no superset, no superset can be captured, or the graph cannot be derived.
    A superset the model refuses (a CaptureError) gives way to the next, narrower one. `superset`: the
    call an earlier build chose (another plan's: its capture is reused, peftc.capture.captured)."""
    built = None
    if superset is not None:
        wide_calls = [superset]
    else:
        with superset_quiet():  # the checks behind the superset call the model with output_attentions too
            defaults = positions_untouched(compilation.spec, plan.serving)
            wide_calls = superset_calls(compilation.source, *example, defaults=defaults) if dynamic_shapes is None else []
    for wide in wide_calls:
        try:
            built = _build_superset(compilation, wide, plan, dump_dir)
        except CaptureError:
            continue  # the model refuses one of the extra inputs: try without them
        derived = _derived(built, compilation, CallSignature.of(*wide), CallSignature.of(*example))
        if derived is not None:
            return FirstBuild(derived, wide, built.graph_module, built.flat)
        break
    own = compilation.build(*example, plan, dynamic_shapes=dynamic_shapes, dump_dir=dump_dir)
    if built is not None:  # the superset build made the adapters: its records say so
        own = replace(own, records=_with_params_added(own.records, built.records))
    return FirstBuild(own)


def _build_superset(compilation: Compilation, wide: tuple[tuple, dict], plan: Plan, dump_dir: Path | None) -> Built:
    """The superset call's build, traced with a PointCache where the model takes a cache (its graph marks where
    the model writes its KV cache: peftc.capture.cache_points); without, should the model refuse that."""
    with superset_quiet():
        if marks_cache(compilation.source, wide[1]):
            try:
                return replace(compilation, source=WithCachePoints(compilation.source)).build(*wide, plan,
                                                                                             dump_dir=dump_dir)
            except CaptureError:
                pass
        return compilation.build(*wide, plan, dump_dir=dump_dir)


def positions_untouched(spec: Spec | None, serving: ServingPlan | None = None) -> bool:
    """Whether no pass of `spec` (or of a serving plan) reads or moves token positions (prompt tuning lengthens
    the sequence, prefix tuning shifts positions): only then may a derived graph compute default positions after
    them. A served model's passes are its adapters' per-site ops, which leave positions alone, unless some adapter
    is prompt or prefix tuning (whose served calls pass explicit positions anyway: peftc.serving.virtual_inputs)."""
    if serving is not None:
        return not serving.has_virtual_tokens
    return spec is not None and all(
        METHODS[entry.method].family != "additive" or entry.method in POSITION_FREE_ADDITIVE
        for entry in spec.adapters)


def _with_params_added(records: list[PassRecord], first: list[PassRecord]) -> list[PassRecord]:
    """`records` with the parameters each pass added in the build that first created them."""
    made = {(r.index, r.name): r.params_added for r in first}
    return [replace(r, params_added=made.get((r.index, r.name), r.params_added) or r.params_added)
            for r in records]


def _derived(built: Built, compilation: Compilation, wide: CallSignature, call: CallSignature) -> Built | None:
    """`built` derived for `call`: the graph to run, and its flat view (what report() and diff() read)."""
    stand_ins = ExtraInputs.of(compilation.source)
    graph = derive_graph(built.graph_module, wide, call, stand_ins)
    if graph is None:
        return None
    flat = graph if built.flat is built.graph_module else derive_graph(built.flat, wide, call, stand_ins)
    return Built(graph, built.records, built.sites, flat=flat) if flat is not None else None

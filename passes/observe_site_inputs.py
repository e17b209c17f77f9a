"""observe_site_inputs: call the calibration recorder with the input of every site it watches.

Only calibration graphs run this pass (peftc.compiler.calibrate): they compute what the base
model computes, and on the way hand each watched site's input to `ctx.shared.calibration`
(a peftc.ir.calibration.SiteInputs) — forward hooks on ops rather than on modules, so a bare
`x @ W.T` is observed as an nn.Linear is.
"""

from __future__ import annotations

import dataclasses

from torch.fx import GraphModule

from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext, PassResult

from ._site_selection import select_sites
from .insert_lora import CALIBRATED_INITS, LORA_KINDS

PROVENANCE = {"pass": "observe_site_inputs", "method": None, "slot": None, "entry": None}


def observe_site_inputs(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Insert recorder(site path, x) before every watched site op, x the op's input."""
    recorder = ctx.shared.calibration
    nodes = {n.name: n for n in gm.graph.nodes}
    result = PassResult(modified=False)
    for site in watched_sites(ctx, recorder):
        node = nodes[site.node_name]
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(recorder.record, (site.path, node.args[site.input_index]))
        call.meta["peftc"] = {**PROVENANCE, "site": site.path}
        result.modified = True
        result.sites.append(site.path)
    return result


def watched_sites(ctx: PassContext, recorder) -> list[Site]:
    """The sites of the spec's LoRA entries whose init reads calibration data (each site once); the
    recorder learns which paths each entry targets (EVA shares its rank budget across them)."""
    chosen: dict[str, Site] = {}
    for index, entry in enumerate(ctx.spec.adapters):
        if getattr(entry, "init", None) in CALIBRATED_INITS:
            entry_ctx = dataclasses.replace(ctx, entry=entry, entry_index=index)
            sites = select_sites(entry_ctx, entry, kinds=LORA_KINDS)  # insert_lora refuses the other kinds
            linear = [s for s in sites if s.kind == "linear"]
            recorder.entry_paths[index] = list(dict.fromkeys(s.path for s in linear))
            chosen.update((s.node_name, s) for s in linear)
    return list(chosen.values())


def needs_calibration(spec) -> bool:
    return any(getattr(entry, "init", None) in CALIBRATED_INITS for entry in spec.adapters)

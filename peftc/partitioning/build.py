"""Building both programs for one call: the flat train graph, tagged by partition_graph, split by side.

The user process and the base process build them the same way from the same call, so their
schedules agree (peftc.partitioning.distributed checks the fingerprint).
"""

from __future__ import annotations

from dataclasses import replace

import torch.fx._pytree as fx_pytree
from torch.utils import _pytree as pytree

from peftc.capture.captured import CapturedGraphs
from peftc.compiler.compilation import Compilation
from peftc.compiler.plan import Plan
from peftc.errors import PartitionError
from peftc.ir import adapters
from peftc.partitioning.program import Programs, build_programs
from peftc.passes.partition_graph import partition_graph
from peftc.pipeline.runner import PassContext, Step, run_pipeline
from peftc.runtime.user_model import weight_view
from peftc.spec.methods import METHODS
from peftc.spec.parse import as_spec


def base_compilation(model, spec) -> Compilation:
    """What a base server builds its programs from for one spec: a weight view of its model (its
    flags never change) and the spec; nothing is captured until a call needs a graph."""
    return Compilation.start(weight_view(model), as_spec(spec))


def build_partition(compilation, args: tuple, kwargs: dict, dynamic_shapes=None) -> Programs:
    """The flat train graph for this call, tagged by partition_graph, split into the two programs."""
    # A fresh capture, not one kept by the compilation (peftc.capture.captured): stage 0 of a partition built
    # on a kept capture failed inside export's guard function (IndexError); cause not found yet.
    fresh = replace(compilation, captured=CapturedGraphs())
    built = fresh.build(args, kwargs, flat_train_plan(), dynamic_shapes=dynamic_shapes)
    gm = built.graph_module
    params = dict(gm.named_parameters(remove_duplicate=False))
    ctx = PassContext(spec=compilation.spec, sites=built.sites, adapter_root=compilation.adapter_root,
                      base_params={n: p for n, p in params.items() if not n.startswith(adapters.ROOT + ".")},
                      trainable=frozenset(n for n, p in params.items()
                                          if p.requires_grad and not n.startswith(adapters.ROOT + ".")),
                      methods=METHODS, shared=compilation.shared)
    run_pipeline(gm, [Step("partition_graph", partition_graph)], ctx)
    programs = build_programs(gm)
    if not programs.cut.exchanges:
        raise PartitionError("partition: no value crosses between base and adapters (the spec adds no adapter "
                             "op to this call's graph); there is nothing to split")
    return programs


def flat_train_plan() -> Plan:
    """The train plan without layer structure or lowered kernels: the partition cuts single ops."""
    return Plan.train("torch", structure_layers=False)


def flat_inputs(programs: Programs, args: tuple, kwargs: dict) -> list:
    if programs.in_spec is None:
        return list(args)
    return list(fx_pytree.tree_flatten_spec((args, kwargs), programs.in_spec))


def unflatten_outputs(programs: Programs, flat: list):
    if programs.out_spec is None:
        return flat[0] if len(flat) == 1 else tuple(flat)
    return pytree.tree_unflatten(flat, programs.out_spec)

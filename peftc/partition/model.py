"""Partition: a compiled model split into the frozen base program and the user's adapter program (DLoRA).

    part = peftc.partition(cm)
    out = part(input_ids=ids, labels=ids)     # what cm(...) returns; out.loss.backward() trains the adapters
    part.traffic()                            # bytes that crossed in the last call (and its backward)
    part.base, part.user                      # nn.Modules: frozen base weights only / adapter tensors only
    print(part.report())                      # the cut: per layer, what crosses, shapes, bytes per token

Both programs are built, per call signature, from the compiled model's flat train graph
(Compilation.build) with passes/partition_graph.py run on it; here they run in one process
through a LocalLink; peftc.partition.distributed runs them in two.
"""

from __future__ import annotations

import torch
import torch.fx._pytree as fx_pytree
from torch import nn
from torch.utils import _pytree as pytree

from peftc.capture.binding import bind_call
from peftc.capture.calls import CallSignature, normalize_call
from peftc.compiler.plan import Plan
from peftc.errors import PartitionError
from peftc.ir import adapters
from peftc.ir.modes import set_mode
from peftc.partition.kill_revive import KillRevive
from peftc.partition.link import LocalLink
from peftc.partition.liveness import Liveness
from peftc.partition.program import Programs, build_programs
from peftc.partition.remote_call import remote_call
from peftc.partition.report import PartitionReport
from peftc.partition.session import UserSession
from peftc.partition.wire import Traffic
from peftc.passes.partition_graph import partition_graph
from peftc.pipeline.runner import PassContext, Step, run_pipeline
from peftc.runtime.call_contract import apply_output_flags, split_output_flags
from peftc.spec.methods import METHODS


class ProgramModules(nn.Module):
    """One side's stage modules for every call signature built so far (parameters shared, listed once)."""

    def __init__(self, side: str, adapter_root: nn.Module | None = None):
        super().__init__()
        self.side = side
        if adapter_root is not None:  # first, so the adapter tensors are named as in adapter_state_dict
            self.add_module(adapters.ROOT, adapter_root)
        self.stages = nn.ModuleList()

    def add(self, stages) -> None:
        for stage in stages:
            self.stages.append(stage.module)


class Partition(nn.Module):
    """The base program and the user program of a compiled model, run in this process."""

    def __init__(self, cm, kill_revive: KillRevive | None = None):
        super().__init__()
        if cm.spec is None:
            raise PartitionError("partition: this model has no spec (a serving model); partition a model from "
                                 "peftc.compile(model, spec)")
        self.__dict__["compiled"] = cm  # not a submodule: the programs hold what each side owns
        self.base = ProgramModules("base")
        self.user = ProgramModules("user", cm.adapter_root)
        self.kill_revive = kill_revive
        self.training = cm.training
        self._programs: dict[CallSignature, Programs] = {}
        self._traffic = Traffic()
        self.first = self.programs_for(*normalize_call(cm.compilation.source, *cm.example_call))

    # -- building --------------------------------------------------------------------------------
    def programs_for(self, args: tuple, kwargs: dict) -> Programs:
        """Both programs for this call's signature, built on first use."""
        signature = CallSignature.of(args, kwargs)
        if signature not in self._programs:
            programs = build_partition(self.compiled.compilation, args, kwargs)
            for side in (programs.base, programs.user):
                for stage in side:
                    set_mode(stage.module, self.training)
            self.base.add(programs.base)
            self.user.add(programs.user)
            self._programs[signature] = programs
        return self._programs[signature]

    # -- calling ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        cm = self.compiled
        args, kwargs = bind_call(cm.compilation.source, args, kwargs)
        kwargs, output_flags = split_output_flags(kwargs)
        args, kwargs = normalize_call(cm.compilation.source, args, kwargs)
        programs = self.programs_for(args, kwargs)
        self._traffic = Traffic(tokens=_tokens(args, kwargs))
        session = UserSession(programs, LocalLink(programs, self._traffic), self.liveness(programs))
        flat = remote_call(session, flat_inputs(programs, args, kwargs))
        return apply_output_flags(unflatten_outputs(programs, flat), output_flags)

    def liveness(self, programs: Programs) -> Liveness:
        dead = self.kill_revive.dead_sites if self.kill_revive is not None else frozenset()
        return Liveness.bind(programs, dead)

    def traffic(self) -> Traffic:
        """What crossed in the last call: its forward, and its backward once that ran."""
        return self._traffic

    def train(self, mode: bool = True):
        self.training = mode
        for module in (*self.base.stages, *self.user.stages):
            set_mode(module, mode)
        return self

    def report(self) -> PartitionReport:
        """The cut of the first call signature: per layer, what crosses, shapes, bytes per token; active sites."""
        dead = self.kill_revive.dead_sites if self.kill_revive is not None else frozenset()
        return PartitionReport.build(self.first, dead)


def partition(cm, kill_revive: KillRevive | None = None) -> Partition:
    """Split a compiled model into its frozen base program and its adapter program (one process)."""
    return Partition(cm, kill_revive)


def build_partition(compilation, args: tuple, kwargs: dict) -> Programs:
    """The flat train graph for this call, tagged by partition_graph, split into the two programs."""
    built = compilation.build(args, kwargs, flat_train_plan())
    gm = built.graph_module
    params = dict(gm.named_parameters(remove_duplicate=False))
    ctx = PassContext(spec=compilation.spec, sites=built.sites, adapter_root=compilation.adapter_root,
                      base_params={n: p for n, p in params.items() if not n.startswith(adapters.ROOT + ".")},
                      trainable=frozenset(n for n, p in params.items()
                                          if p.requires_grad and not n.startswith(adapters.ROOT + ".")),
                      methods=METHODS, shared=compilation.shared)
    run_pipeline(gm, [Step("partition_graph", partition_graph)], ctx)
    return build_programs(gm)


def flat_train_plan() -> Plan:
    """The train plan without layer structure or lowered kernels: the partition cuts single ops."""
    return Plan.train("torch")


def flat_inputs(programs: Programs, args: tuple, kwargs: dict) -> list:
    if programs.in_spec is None:
        return list(args)
    return list(fx_pytree.tree_flatten_spec((args, kwargs), programs.in_spec))


def unflatten_outputs(programs: Programs, flat: list):
    if programs.out_spec is None:
        return flat[0] if len(flat) == 1 else tuple(flat)
    return pytree.tree_unflatten(flat, programs.out_spec)


def _tokens(args: tuple, kwargs: dict) -> int:
    """batch x sequence of the main input (input_ids, or the first 2-D tensor): per-token figures."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    return int(ids.shape[0] * ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0

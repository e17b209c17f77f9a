"""Partition: a compiled model split into the frozen base program and the user's adapter program (DLoRA).

    part = peftc.partition(cm)
    out = part(input_ids=ids, labels=ids)     # what cm(...) returns; out.loss.backward() trains the adapters
    part.traffic()                            # bytes that crossed in the last call (and its backward)
    part.base, part.user                      # nn.Modules: frozen base weights only / adapter tensors only
    print(part.report())                      # the cut: per layer, what crosses, shapes, bytes per token

Both programs are built, per call signature, from the compiled model's flat train graph
(Compilation.build) with passes/partition_graph.py run on it; here they run in one process
through a LocalLink; peftc.partitioning.distributed runs them in two.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree

from peftc.capture.binding import bind_call
from peftc.capture.calls import CallSignature, normalize_call
from peftc.errors import PartitionError
from peftc.ir import adapters
from peftc.ir.modes import set_mode
from peftc.partitioning import distributed
from peftc.partitioning.build import build_partition, flat_inputs, unflatten_outputs
from peftc.partitioning.generation import PartitionGenerator
from peftc.partitioning.kill_revive import KillRevive
from peftc.partitioning.link import LocalLink
from peftc.partitioning.liveness import Liveness
from peftc.partitioning.program import Programs
from peftc.partitioning.remote_call import remote_call
from peftc.partitioning.report import PartitionReport
from peftc.partitioning.session import UserSession
from peftc.partitioning.wire import Traffic
from peftc.runtime.call_contract import apply_output_flags, split_output_flags
from peftc.runtime.generate import generate


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

    def __init__(self, cm, kill_revive: KillRevive | None = None, base_rank: int | None = None):
        super().__init__()
        if cm.spec is None:
            raise PartitionError("partition: this model has no spec (a serving model); partition a model from "
                                 "peftc.compile(model, spec)")
        self.__dict__["compiled"] = cm  # not a submodule: the programs hold what each side owns
        self.base = ProgramModules("base")
        self.user = ProgramModules("user", cm.adapter_root)
        self.kill_revive = kill_revive
        self.base_rank = base_rank  # None: the base program runs here; a rank: it serves from that process
        self.training = cm.training
        self._programs: dict[CallSignature, Programs] = {}
        self._traffic = Traffic()
        self._first: Programs | None = None
        self._generator: PartitionGenerator | None = None
        first = self.first  # built now: a model that cannot be split fails here, not at its first call
        if kill_revive is not None:
            kill_revive.bind(cm.adapter_root, killable_sites(first))

    @property
    def first(self) -> Programs:
        """The programs of the first call (or of the compiled model's example call, if none ran yet)."""
        if self._first is None:
            self.programs_for(*normalize_call(self.compiled.compilation.source, *self.compiled.example_call))
        return self._first

    # -- building --------------------------------------------------------------------------------
    def programs_for(self, args: tuple, kwargs: dict) -> Programs:
        """Both programs for this call's signature, built on first use."""
        signature = CallSignature.of(args, kwargs)
        if signature not in self._programs:
            # the base receives contiguous copies: build from what it will see (export may guard on strides)
            args, kwargs = pytree.tree_map_only(torch.Tensor, torch.Tensor.contiguous, (args, kwargs))
            programs = build_partition(self.compiled.compilation, args, kwargs)
            for side in (programs.base, programs.user):
                for stage in side:
                    set_mode(stage.module, self.training)
            self.base.add(programs.base)
            self.user.add(programs.user)
            self._programs[signature] = programs
            self._first = self._first or programs
        return self._programs[signature]

    # -- calling ---------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        cm = self.compiled
        args, kwargs = bind_call(cm.compilation.source, args, kwargs)
        kwargs, output_flags = split_output_flags(kwargs)
        args, kwargs = normalize_call(cm.compilation.source, args, kwargs)
        programs = self.programs_for(args, kwargs)
        self._traffic = Traffic(tokens=_tokens(args, kwargs))
        session = UserSession(programs, self._link(programs, args, kwargs), self.liveness(programs))
        flat = remote_call(session, flat_inputs(programs, args, kwargs))
        return apply_output_flags(unflatten_outputs(programs, flat), output_flags)

    def _link(self, programs: Programs, args: tuple, kwargs: dict):
        if self.base_rank is None:
            return LocalLink(programs, self._traffic)
        return distributed.DistributedLink(programs, self._traffic, (args, kwargs), self.base_rank)

    def liveness(self, programs: Programs) -> Liveness:
        dead = self.kill_revive.dead_sites if self.kill_revive is not None else frozenset()
        return Liveness.bind(programs, dead)

    def generate(self, input_ids, attention_mask=None, generation_config=None, **kwargs):
        """Generate as cm.generate does (KV cache inside the base program); `generation_traffic()` then
        holds what crossed for the prompt and for each generated token."""
        if self.base_rank is not None:
            raise NotImplementedError("generate() runs the partition in this process; over torch.distributed "
                                      "(connect) it is not implemented: call the partition per step instead")
        if self._generator is None:
            self._generator = PartitionGenerator(self)
        self._generator.traffic_log.clear()
        return generate(self._generator, input_ids, attention_mask, generation_config, **kwargs)

    def generation_traffic(self) -> list[Traffic]:
        """The last generate(): the prefill's traffic, then one entry per decode step (one token each)."""
        return list(self._generator.traffic_log) if self._generator is not None else []

    def traffic(self) -> Traffic:
        """What crossed in the last call: its forward, and its backward once that ran."""
        return self._traffic

    def train(self, mode: bool = True):
        self.training = mode
        for module in (*self.base.stages, *self.user.stages):
            set_mode(module, mode)
        return self

    def close(self) -> None:
        """Tell the base server this user is done (two processes); nothing to do in one."""
        if self.base_rank is not None:
            distributed.goodbye(self.base_rank)
            self.base_rank = None

    def report(self) -> PartitionReport:
        """The cut of the first call signature: per layer, what crosses, shapes, bytes per token; active sites."""
        dead = self.kill_revive.dead_sites if self.kill_revive is not None else frozenset()
        return PartitionReport.build(self.first, dead)


def killable_sites(programs: Programs) -> set[str]:
    """Sites all of whose deltas the base merges by add (Kill-and-Revive may switch them off)."""
    sites = {programs.sites[n] for n in programs.killable if programs.sites.get(n)}
    return sites - {programs.sites.get(n) for n in programs.to_base_names - programs.killable}


def partition(cm, kill_revive: KillRevive | None = None) -> Partition:
    """Split a compiled model into its frozen base program and its adapter program (one process)."""
    return Partition(cm, kill_revive)


def connect(cm, base_rank: int = 0, kill_revive: KillRevive | None = None) -> Partition:
    """This process's adapters, with the base served by `serve_base` on `base_rank` (torch.distributed
    already initialized). Calls and backward go through the base; `close()` when done."""
    part = Partition(cm, kill_revive, base_rank=base_rank)
    distributed.hello(cm.spec.to_dict(), base_rank)
    return part


def serve_base(model, users: list[int] | None = None) -> dict:
    """Serve `model`'s frozen base to the user ranks (default: every other rank) until each closes;
    returns what each user exchanged, as the base counted it (and "weight_gradients": how many base
    weights hold a gradient, 0). Graphs are built per (user spec, call
    signature) from the calls themselves; the adapters those builds create are never read (the base
    programs hold base weights only)."""
    me = torch.distributed.get_rank()
    users = users if users is not None else [r for r in range(torch.distributed.get_world_size()) if r != me]
    return distributed.BaseServer(model, users).serve()


def _tokens(args: tuple, kwargs: dict) -> int:
    """batch x sequence of the main input (input_ids, or the first 2-D tensor): per-token figures."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        ids = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
    return int(ids.shape[0] * ids.shape[1]) if ids is not None and ids.dim() >= 2 else 0

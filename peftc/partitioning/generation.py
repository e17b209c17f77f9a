"""generate() through a partition: the decoding loop of peftc.runtime.generate over partitioned graphs.

The prefill and one-token decode graphs are captured with the StaticCache inside (as the
compiled model's generate does) and split like any other graph: the cache buffers and their
updates belong to the base program, so the base keeps each user's KV cache and a decode step
exchanges one token's site inputs and deltas per layer. Each call's traffic is kept, so the
bytes per generated token are measured, not estimated.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from peftc.partitioning.build import build_partition, flat_inputs, unflatten_outputs
from peftc.partitioning.link import LocalLink
from peftc.partitioning.session import UserSession
from peftc.partitioning.wire import Traffic
from peftc.runtime.generate import Generator


class PartitionedGraph(nn.Module):
    """Called like a captured graph (keyword inputs -> outputs); runs both programs without grad."""

    def __init__(self, programs, liveness, traffic_log: list):
        super().__init__()
        self.programs = programs
        self.liveness = liveness  # () -> Liveness for this schedule
        self.traffic_log = traffic_log
        self.stages = nn.ModuleList(s.module for s in (*programs.base, *programs.user))

    def forward(self, **kwargs):
        traffic = Traffic(tokens=int(kwargs["input_ids"].numel()))
        session = UserSession(self.programs, LocalLink(self.programs, traffic), self.liveness(self.programs))
        outputs = session.forward(flat_inputs(self.programs, (), kwargs), grad=False)
        self.traffic_log.append(traffic)
        return unflatten_outputs(self.programs, outputs)


class PartitionGenerator(Generator):
    """Generator whose graphs are partitions of the cache-holding graphs the compiled model would use."""

    def __init__(self, partition):
        super().__init__(partition.compiled.compilation, None)
        self.partition = partition
        self.traffic_log: list[Traffic] = []

    def build(self, source: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: dict) -> PartitionedGraph:
        programs = build_partition(replace(self.compilation, source=source), args, kwargs, dynamic_shapes)
        self.partition.base.add(programs.base)  # the cache buffers join the base program's state
        self.partition.user.add(programs.user)
        return PartitionedGraph(programs, self.partition.liveness, self.traffic_log)

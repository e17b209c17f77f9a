"""Which sites take part in a call: all of them, or all but those Kill-and-Revive switched off.

A killed site's delta does not travel: the base adds a zero in its place (`y + s·0 == y`), so
only sites whose deltas the base merges by add/sub can be killed (`Programs.killable`). A site
input travels only while a live delta needs it, and the user's stages are pruned to the values
live deltas depend on, so nothing is computed from an input that did not come.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.fx import Graph

from peftc.partitioning.program import Programs, Stage, stage_module


@dataclass(frozen=True)
class Liveness:
    """The sites switched off for one call; `bind` works out what that means for one schedule."""

    dead_sites: frozenset = frozenset()
    dead_values: frozenset = frozenset()  # to_base names not sent
    needed_inputs: frozenset | None = None  # to_user names still needed (None: all)
    stages: tuple[Stage, ...] | None = None  # user stages pruned to the live values (None: as built)

    @classmethod
    def bind(cls, programs: Programs, dead_sites=frozenset()) -> "Liveness":
        dead_sites = frozenset(dead_sites)
        if not dead_sites:
            return cls()
        dead_values = frozenset(n for n in programs.killable if programs.sites.get(n) in dead_sites)
        needed, stages = _prune(programs, dead_values)
        return cls(dead_sites, dead_values, needed, stages)

    def needs(self, name: str) -> bool:
        return self.needed_inputs is None or name in self.needed_inputs

    def sends(self, name: str) -> bool:
        return name not in self.dead_values

    def fill_dead(self, names, received: list, programs: Programs) -> list:
        """Received values, with a zero scalar where a killed site's delta would be."""
        return [_zero(programs.value_meta.get(n)) if n in self.dead_values else v for n, v in zip(names, received)]

    def user_stages(self, programs: Programs) -> tuple[Stage, ...]:
        return self.stages if self.stages is not None else programs.user


def _zero(meta) -> torch.Tensor:
    dtype = meta.dtype if isinstance(meta, torch.Tensor) else torch.get_default_dtype()
    return torch.zeros((), dtype=dtype)


def _prune(programs: Programs, dead_values: frozenset) -> tuple[frozenset, tuple[Stage, ...]]:
    """(to_user names still needed, user stages computing only live values), walking stages last to first."""
    needed_later: set[str] = set()
    pruned: list[Stage] = []
    for stage in reversed(programs.user):
        live = programs.to_base_names - dead_values
        keep = [o for o in stage.outputs if o in needed_later or o in live]
        module, reads = _pruned_module(stage, keep)
        needed_later |= reads
        pruned.append(replace(stage, module=module, outputs=tuple(keep)))
    pruned.reverse()
    to_user = {n for ex in programs.cut.exchanges for n in ex.to_user}
    return frozenset(needed_later & to_user), tuple(pruned)


def _pruned_module(stage: Stage, keep: list[str]):
    """A copy of the stage module returning only `keep`, dead code removed; and the inputs it still reads."""
    graph = Graph()
    returned = graph.graph_copy(stage.module.graph, {})
    by_name = dict(zip(stage.outputs, returned))
    graph.output(tuple(by_name[name] for name in keep))
    graph.eliminate_dead_code()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    reads = {name for name, node in zip(stage.inputs, placeholders) if node.users}
    return stage_module(stage.module, graph, type(stage.module).__name__), reads

"""The cut of a partitioned graph: which program runs each node, in which stage, and what crosses.

`passes/partition_graph.py` tags every node with a `Placement` (meta["peftc_partition"]): the
side ("base": the frozen model, "user": the adapters) and the stage. The base program runs
stages 0..K, the user program stages 0..K-1; exchange k sends the base values user stage k
needs (`to_user`) and brings back the user values base stage k+1 needs (`to_base`). `cut_of`
reads the tags back into that schedule; the runtime (peftc.partitioning) builds its programs from it.

get_attr nodes take no stage: each stage that reads a weight reads it itself, so parameters
never travel between stages (and adapter gradients land on the adapter parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Graph, Node

from peftc.ir import adapters

PARTITION_KEY = "peftc_partition"
BASE, USER = "base", "user"


@dataclass(frozen=True)
class Placement:
    side: str  # BASE | USER
    stage: int


@dataclass(frozen=True)
class Exchange:
    """One round trip: base values user stage `index` reads, then user values the base reads next."""

    index: int
    to_user: tuple[str, ...]  # node names, in graph order
    to_base: tuple[str, ...]


@dataclass(frozen=True)
class Cut:
    exchanges: tuple[Exchange, ...]
    base_stages: int  # K + 1: the base runs one stage more than there are exchanges

    @property
    def crossing(self) -> tuple[str, ...]:
        return tuple(name for ex in self.exchanges for name in (*ex.to_user, *ex.to_base))


def placement(node: Node) -> Placement | None:
    return node.meta.get(PARTITION_KEY)


def is_adapter_tensor(node: Node) -> bool:
    """A get_attr of a tensor under the adapter root (`peftc.`...)."""
    return node.op == "get_attr" and str(node.target).startswith(adapters.ROOT + ".")


def cut_of(graph: Graph) -> Cut:
    """The exchanges a tagged graph needs: each value sent once, at the first stage that reads it."""
    first_read: dict[Node, int] = {}
    for node in graph.nodes:
        here = placement(node)
        if here is None:
            continue
        for source in node.all_input_nodes:
            there = placement(source)
            if source.op == "get_attr" or there is None or there.side == here.side:
                continue
            # a base value crosses for user stage s; a user value of stage s crosses in exchange s
            stage = here.stage if here.side == USER else there.stage
            first_read[source] = min(stage, first_read.get(source, stage))
    base_stages = 1 + max((p.stage for n in graph.nodes if (p := placement(n)) and p.side == BASE), default=0)
    exchanges = []
    for k in range(base_stages - 1):
        to_user = tuple(n.name for n in graph.nodes if first_read.get(n) == k and placement(n).side == BASE)
        to_base = tuple(n.name for n in graph.nodes if first_read.get(n) == k and placement(n).side == USER)
        exchanges.append(Exchange(k, to_user, to_base))
    return Cut(tuple(exchanges), base_stages)

"""The two programs of a partitioned graph: one GraphModule per stage, per side.

From a graph tagged by passes/partition_graph.py: each stage's nodes are copied, in graph
order, into their own fx graph whose inputs are the values it reads from elsewhere (earlier
stages, the other side, the call's inputs) and whose outputs are the values read elsewhere.
Weights are read in place by each stage (get_attr), so base stages hold frozen base weights
only and user stages adapter tensors only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from torch import nn
from torch.fx import Graph, GraphModule, Node

from peftc.ir import adapters
from peftc.ir.partition import BASE, USER, Cut, cut_of, placement
from peftc.passes.partition_graph import MERGE_OPS


@dataclass(frozen=True)
class Stage:
    index: int
    module: GraphModule
    inputs: tuple[str, ...]  # node names read from outside the stage, in graph order
    outputs: tuple[str, ...]  # node names read outside the stage


@dataclass(frozen=True)
class Programs:
    """Both sides' stages for one call signature, and the call's flat inputs and outputs."""

    base: tuple[Stage, ...]
    user: tuple[Stage, ...]
    cut: Cut
    placeholders: tuple[str, ...]  # the graph's flat inputs, in order
    outputs: tuple  # the output node's flat args: node names, or constants as they are
    in_spec: object
    out_spec: object
    value_meta: dict  # node name -> meta["val"] of every crossing value (shapes for the report)
    sites: dict  # crossing node name -> adapter site path it belongs to (from provenance), if any
    to_base_names: frozenset
    killable: frozenset  # to_base names the base merges by add/sub (Kill-and-Revive may drop them)

    def fingerprint(self) -> str:
        """A digest of the schedule: two processes that built it differently must not pair up. Node
        names are not part of it (some carry process-wide counters); each crossing value's place, site,
        dtype and rank are."""
        def describe(name):
            meta = self.value_meta.get(name)
            return (self.sites.get(name), str(getattr(meta, "dtype", type(meta).__name__)), getattr(meta, "ndim", -1))

        text = repr([([describe(n) for n in ex.to_user], [describe(n) for n in ex.to_base])
                     for ex in self.cut.exchanges]) + repr(len(self.outputs))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_programs(gm: GraphModule) -> Programs:
    """Split a graph tagged by partition_graph into its base and user stage modules."""
    cut = cut_of(gm.graph)
    nodes = list(gm.graph.nodes)
    output = next(n for n in nodes if n.op == "output")
    base = tuple(_stage(gm, nodes, BASE, k) for k in range(cut.base_stages))
    user = tuple(_stage(gm, nodes, USER, k) for k in range(cut.base_stages - 1))
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    by_name = {n.name: n for n in nodes}
    return Programs(
        base=base, user=user, cut=cut,
        placeholders=tuple(n.name for n in nodes if n.op == "placeholder"),
        outputs=tuple(a.name if isinstance(a, Node) else a for a in _flat(output.args[0])),
        in_spec=info.in_spec if info else None, out_spec=info.out_spec if info else None,
        value_meta={name: by_name[name].meta.get("val") for name in cut.crossing},
        sites={name: _site_of(by_name[name]) for name in cut.crossing},
        to_base_names=frozenset(n for ex in cut.exchanges for n in ex.to_base),
        killable=frozenset(n for ex in cut.exchanges for n in ex.to_base if _merged_by_add(by_name[n])),
    )


def _merged_by_add(node: Node) -> bool:
    """Every reader adds (or subtracts) this value to another: a zero in its place leaves the other as it was."""
    return all(u.target in MERGE_OPS and len(u.args) >= 2 and u.args[1] is node and u.args[0] is not node
               for u in node.users)


def stage_module(root: nn.Module, graph: Graph, name: str) -> GraphModule:
    """A GraphModule of `graph` over `root`'s attributes; adapter tensors are read through the live
    adapter tree (not copies of its modules), so loading or replacing adapters reaches every stage."""
    module = GraphModule(root, graph, class_name=name)
    adapter_root = getattr(root, adapters.ROOT, None)
    if adapter_root is not None and hasattr(module, adapters.ROOT):
        delattr(module, adapters.ROOT)
        module.add_module(adapters.ROOT, adapter_root)
    return module


def _flat(value) -> list:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _flat(item)]
    return [value]


def _site_of(node: Node) -> str | None:
    """The adapter site a delta belongs to; for a site input, the sites reading it (comma-separated)."""
    tag = node.meta.get("peftc") or {}
    if tag.get("site"):
        return tag["site"]
    readers = set()
    for user in node.users:
        tag = user.meta.get("peftc") or {}
        readers.update(tag.get("sites") or ([tag["site"]] if tag.get("site") else []))
    return ",".join(sorted(readers)) or None


def _stage(gm: GraphModule, nodes: list[Node], side: str, index: int) -> Stage:
    """The nodes of (side, index), as one GraphModule over the values they read from outside."""
    members = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")
               and placement(n).side == side and placement(n).stage == index]
    member_set = set(members)
    position = {n: i for i, n in enumerate(nodes)}
    inputs = sorted({source for node in members for source in node.all_input_nodes
                     if source.op != "get_attr" and source not in member_set}, key=position.__getitem__)
    graph = Graph()
    env: dict[Node, Node] = {}
    for source in inputs:
        env[source] = graph.placeholder(source.name)
        env[source].meta = dict(source.meta)
    for node in members:
        for source in node.all_input_nodes:
            if source.op == "get_attr" and source not in env:
                env[source] = graph.node_copy(source)
        env[node] = graph.node_copy(node, lambda n: env[n])
    outputs = [n for n in members if any(u not in member_set for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))
    module = stage_module(gm, graph, f"{side.capitalize()}Stage{index}")
    return Stage(index, module, tuple(n.name for n in inputs), tuple(n.name for n in outputs))

"""Views of a compiled graph: node facts (one-line text, shapes), scopes and a networkx graph.

The before/after diff built from these is in peftc.inspect.diff.
"""

from __future__ import annotations

import fnmatch

from torch.fx import GraphModule, Node

from peftc.core.targets import nearest_hint
from peftc.errors import ScopeError
from peftc.ir.graph_edit import provenance
from peftc.ir.node_text import node_dtype, node_module_path
from peftc.ir.shapes import node_shape

GLOB_CHARS = set("*?[")


# -- scopes ------------------------------------------------------------------------------
def in_scope(path: str, scope: str | None) -> bool:
    """`scope` is a module path (it and everything under it) or a glob over module paths."""
    if not scope:
        return True
    if GLOB_CHARS & set(scope):
        return fnmatch.fnmatchcase(path, scope) or fnmatch.fnmatchcase(path, scope + ".*")
    return path == scope or path.startswith(scope + ".")


def select_nodes(gm: GraphModule, scope: str | None = None) -> list[Node]:
    """The graph's nodes whose module path lies in `scope` (all nodes for None), in graph order."""
    nodes = [n for n in gm.graph.nodes if in_scope(node_module_path(n), scope)]
    if not nodes:
        paths = sorted({node_module_path(n) for n in gm.graph.nodes} - {""})
        raise ScopeError(f"scope {scope!r} matches no module path of the graph; {nearest_hint(scope, paths)}")
    return nodes


# -- networkx ------------------------------------------------------------------------------
def to_networkx(gm: GraphModule, scope: str | None = None):
    """A networkx.DiGraph: one node per graph node (by name), an edge per data dependency.

    `shape` is a tuple of the example inputs' sizes; `dynamic_dims` the indices of the dims
    that vary with the input (see peftc.ir.shapes).
    """
    import networkx as nx

    chosen = select_nodes(gm, scope)
    names = {n.name for n in chosen}
    graph = nx.DiGraph()
    for node in chosen:
        tag = provenance(node) or {}
        shape = node_shape(node)
        graph.add_node(node.name, op=node.op, target=str(node.target), module_path=node_module_path(node),
                       shape=None if shape is None else shape.sizes,
                       dynamic_dims=None if shape is None else shape.dynamic, dtype=node_dtype(node),
                       inserted_by=tag.get("pass"),
                       method=tag.get("method"), site=tag.get("site"))
    for node in chosen:
        for source in node.all_input_nodes:
            if source.name in names:
                graph.add_edge(source.name, node.name)
    return graph

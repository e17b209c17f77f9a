"""What one pass removed or rewired, kept as text so that the diff can show the graph before it.

The pipeline wraps each pass in a `ChangeWatch`: before the pass it keeps a reference to every
node's argument tuples (no copies: fx replaces a node's tuples when it rewires or erases it,
so the old ones stay as they were); after the pass, nodes that left the graph are `erased`
and nodes whose arguments changed are `rewired`. Only those few nodes are turned into text.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule, Node

from peftc.ir.graph_edit import provenance
from peftc.ir.node_text import format_node, node_module_path, op_name
from peftc.ir.shapes import Shape, node_shape


@dataclass(frozen=True)
class NodeText:
    """A node as it read before a pass: enough for a diff line, and no reference to the graph."""

    name: str
    op: str  # `aten.linear.default`, `placeholder`, ...; `get_attr` for any parameter read
    line: str  # format_node() with the arguments it had before the pass
    module_path: str
    site: str | None  # the site it served, for a node a pass had inserted
    inserted_by: dict | None  # that node's meta["peftc"] tag; None for a node of the captured graph
    shape: Shape | None

    @property
    def key(self) -> str | None:
        """The diff block it belongs to: its site, else its module path."""
        return self.site or self.module_path or None


class ChangeWatch:
    """Remembers the graph's nodes and their inputs before a pass, to tell what the pass changed."""

    def __init__(self, gm: GraphModule):
        self._inputs = {node: (node.args, node.kwargs) for node in gm.graph.nodes}

    def erased(self, gm: GraphModule) -> tuple[NodeText, ...]:
        """Nodes that were in the graph before the pass and are not now, in their old graph order."""
        alive = set(gm.graph.nodes)
        return tuple(self._text(node) for node in self._inputs if node not in alive)

    def rewired(self, gm: GraphModule) -> tuple[NodeText, ...]:
        """Nodes still in the graph whose inputs the pass changed, as they read before it."""
        return tuple(self._text(node) for node in gm.graph.nodes
                     if node in self._inputs and _inputs_changed(node, self._inputs[node]))

    def _text(self, node: Node) -> NodeText:
        args, kwargs = self._inputs[node]
        tag = provenance(node)
        op = "get_attr" if node.op == "get_attr" else op_name(node)  # the target names a layer: not the op
        return NodeText(name=node.name, op=op, line=format_node(node, args, kwargs),
                        module_path=node_module_path(node), site=None if tag is None else tag.get("site"),
                        inserted_by=None if tag is None else dict(tag), shape=node_shape(node))


def _inputs_changed(node: Node, before: tuple) -> bool:
    # Identity, not equality: fx builds new tuples whenever a node's inputs are replaced.
    return node.args is not before[0] or node.kwargs is not before[1]

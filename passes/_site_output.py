"""Where a site's value currently ends: after the updates earlier entries added to its output."""

from __future__ import annotations

from torch.fx import Node

from peftc.ir.graph_edit import provenance


def current_output(node: Node) -> Node:
    """The last `add(output, delta)` an earlier method chained onto `node`, or `node` itself.

    Methods compose in spec order: a serial adapter after LoRA on the same site must see the
    LoRA-updated output, so it anchors on the end of that chain, not on the bare op.
    """
    while True:
        chained = [u for u in node.users
                   if (provenance(u) or {}).get("role") == "output" and u.args and u.args[0] is node]
        if not chained:
            return node
        node = chained[0]

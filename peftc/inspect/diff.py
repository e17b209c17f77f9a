"""The graph before vs after the passes, as text grouped by site (`cm.diff(scope)`).

No second copy of the graph is kept. Inserted nodes carry `meta["peftc"]` (pass, method, site),
so the nodes without it are the captured ones; what a pass erased or rewired comes from its
`PassRecord` (`erased`, `rewired`: the nodes as they read before the pass, see graph_changes).
Lines: `- ` a node a pass removed, `+ ` a node a pass inserted that is still in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.fx import GraphModule, Node

from peftc.core.paths import group_paths
from peftc.inspect.graph_view import in_scope, select_nodes
from peftc.ir.graph_edit import provenance
from peftc.ir.node_text import format_node, node_module_path, op_name
from peftc.ir.shapes import LEGEND, has_dynamic, node_shape

if TYPE_CHECKING:
    from peftc.pipeline.changes import NodeText
    from peftc.pipeline.runner import PassRecord


@dataclass
class SiteChange:
    """What the passes did around one site: its op, the nodes they removed and inserted, who reads them."""

    site: str
    original: Node | None  # the site's op, a node of the captured graph still in it
    before: "NodeText | None"  # `original` as it read before a pass changed its inputs
    erased: list[tuple["NodeText", "PassRecord"]]  # (a removed node as it read, the pass that removed it)
    inserted: list[Node]
    readers: list[Node]  # original nodes that now read an inserted node (they read `original` before)

    def signature(self) -> tuple:
        """What makes two sites' changes the same rewrite (used to fold repeated layers)."""
        return (op_name(self.original) if self.original is not None else None,
                node_shape(self.original) if self.original is not None else None,
                self.before is not None,
                tuple((text.op, text.shape, _record_label(by), _tag_label(text.inserted_by))
                      for text, by in self.erased),
                tuple((_tag_label(provenance(n)), op_name(n) if n.op != "get_attr" else "get_attr", node_shape(n))
                      for n in self.inserted))

    def shapes(self) -> list:
        nodes = self.inserted + ([self.original] if self.original is not None else [])
        return [node_shape(n) for n in nodes] + [text.shape for text, _ in self.erased]


def site_changes(gm: GraphModule, sites, records, scope: str | None = None) -> list[SiteChange]:
    """Removed and inserted nodes grouped by the site they served (or their module path)."""
    inserted = _inserted_by_key(gm)
    erased = _erased_by_key(records)
    before = _first_inputs(records)
    site_nodes = {s.path: s.node_name for s in sites}
    by_name = {n.name: n for n in gm.graph.nodes}
    changes = []
    for key in dict.fromkeys([*inserted, *erased]):
        if not in_scope(key, scope):
            continue
        original = by_name.get(site_nodes.get(key, ""))
        if original is not None and provenance(original) is not None:
            original = None  # the site's op is now one a pass inserted (a quantized linear): no "after" line
        nodes = inserted.get(key, [])
        members = set(nodes)
        readers = [u for n in nodes for u in n.users if u not in members and provenance(u) is None]
        changes.append(SiteChange(site=key, original=original,
                                  before=before.get(original.name) if original is not None else None,
                                  erased=erased.get(key, []), inserted=nodes, readers=list(dict.fromkeys(readers))))
    return changes


def _inserted_by_key(gm: GraphModule) -> dict[str, list[Node]]:
    groups: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        tag = provenance(node)
        if tag is not None:
            groups.setdefault(tag.get("site") or node_module_path(node) or f"({tag.get('pass')})", []).append(node)
    return groups


def _erased_by_key(records) -> dict[str, list[tuple["NodeText", "PassRecord"]]]:
    groups: dict[str, list] = {}
    for record in records:
        for text in record.erased:
            groups.setdefault(text.key or f"({record.name})", []).append((text, record))
    return groups


def _first_inputs(records) -> dict[str, "NodeText"]:
    """Each rewired node as it read before the first pass that changed it: as captured."""
    first: dict[str, NodeText] = {}
    for record in records:
        for text in record.rewired:
            first.setdefault(text.name, text)
    return first


def diff_text(gm: GraphModule, sites, records, scope: str | None = None) -> str:
    """The graph before vs after, grouped by site; repeated layers with the same rewrite are folded."""
    if scope is not None and not any(in_scope(key, scope) for key in _erased_by_key(records)):
        select_nodes(gm, scope)  # a scope that names nothing is an error, not an empty diff
    changes = site_changes(gm, sites, records, scope)
    lines = [_diff_header(gm, records, changes, scope)]
    if has_dynamic(shape for change in changes for shape in change.shapes()):
        lines.append(f"shapes: {LEGEND}")
    by_signature: dict[tuple, list[SiteChange]] = {}
    for change in changes:
        by_signature.setdefault(change.signature(), []).append(change)
    order = {(r.name, r.entry_index): r.index for r in records}
    for group in by_signature.values():
        by_site = {c.site: c for c in group}
        for label, members in group_paths([c.site for c in group]):
            lines += [""] + _site_block(label, by_site[members[0]], len(members), order)
    if not changes:
        lines += ["", "no nodes inserted or removed" + (f" under {scope!r}" if scope else "")]
    return "\n".join(lines)


def _diff_header(gm: GraphModule, records, changes: list[SiteChange], scope: str | None) -> str:
    original_now = sum(1 for n in gm.graph.nodes if provenance(n) is None)
    captured = records[0].nodes_before if records else original_now
    inserted = sum(len(c.inserted) for c in changes)
    removed = sum(len(c.erased) for c in changes)
    where = f" under {scope!r}" if scope else ""
    return (f"graph: {captured:,} nodes captured -> {len(gm.graph.nodes):,} now "
            f"({captured - original_now:,} original removed); "
            f"{inserted:,} inserted, {removed:,} removed at {_plural(len(changes), 'site')}{where}")


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def _pass_label(name: str, entry: int | None, slot: str | None = None) -> str:
    """`insert_lora[0] (lora)`: the pass, the spec entry it ran for, and the adapter slot if any."""
    return name + (f"[{entry}]" if entry is not None else "") + (f" ({slot})" if slot else "")


def _tag_label(tag: dict | None) -> str | None:
    if tag is None:
        return None
    return _pass_label(tag.get("pass"), tag.get("entry"), tag.get("slot") or tag.get("method"))


def _record_label(record) -> str:
    return _pass_label(record.name, record.entry_index)


def _block_passes(change: SiteChange, order: dict) -> list[str]:
    """The passes that inserted or removed nodes of this block, once each, in pipeline order."""
    found: dict[tuple, tuple[int, str]] = {}  # (pass, entry) -> (its place in the pipeline, its label)
    for _, record in change.erased:
        found[(record.name, record.entry_index)] = (record.index, _record_label(record))
    for node in change.inserted:
        tag = provenance(node)
        key = (tag.get("pass"), tag.get("entry"))
        index = order.get(key, len(order))
        if key not in order and (key[0], None) in order:
            # A pass run once for the whole spec that tags its nodes with the entry they serve
            # (lower_lora_triton: the LoRA entry it fused): one pass, named by its tag.
            found.pop((key[0], None), None)
            index = order[(key[0], None)]
        found[key] = (index, _tag_label(tag))
    return [label for _, label in sorted(found.values())]


def _erased_note(text: "NodeText", by: "PassRecord") -> str:
    inserted = _tag_label(text.inserted_by)
    removed = f"removed by {_record_label(by)}"
    return removed if inserted is None else f"inserted by {inserted}, {removed}"


def _site_block(label: str, change: SiteChange, count: int, order: dict) -> list[str]:
    head = f"{label}    by {', '.join(_block_passes(change, order))}"
    if count > 1:
        head += f"    [{count} sites, same rewrite; shown: {change.site}]"
    original = change.original
    readers = [r for r in change.readers if r is not original]
    lines = [head]
    if original is not None and change.before is not None:  # a pass changed what the op reads
        lines += [f"  before  {change.before.line}", f"  after   {format_node(original)}"]
    elif original is not None:
        lines.append(f"  before  {format_node(original)}")
        if readers:
            lines.append(f"          read by {', '.join(r.name for r in readers)}")
        lines.append(f"  after   {format_node(original)}")
    elif not change.erased:
        lines += ["  before  (no site op: nodes added at this module)", "  after"]
    lines += [f"        - {text.line}    {_erased_note(text, by)}" for text, by in change.erased]
    lines += [f"        + {format_node(n)}" for n in change.inserted]
    if readers:
        outputs = sorted({n.name for n in change.inserted for u in n.users if u in readers})
        lines.append(f"          {', '.join(r.name for r in readers)} now read {', '.join(outputs)}")
    return lines

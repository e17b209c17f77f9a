"""Views of a compiled graph: node facts, scopes, the before/after diff and a networkx graph.

The "before" graph needs no second copy: every node a pass inserts carries `meta["peftc"]`
(pass, method, site), so the nodes without it are the captured ones. Nodes a pass erased are
counted from the pipeline's records (the node count at capture minus the originals left).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from . import adapters
from .graph_edit import provenance
from .sites import module_path_of
from .targets import nearest_hint

GLOB_CHARS = set("*?[")
# torch.export's placeholder for "no module": treat it as the top level.
EMPTY_STACK_MARKERS = ("_empty_nn_module_stack_from_metadata_hook",)


class ScopeError(ValueError):
    """A `scope` names no module path of the graph."""


# -- facts about one node ----------------------------------------------------------------
def node_module_path(node: Node) -> str:
    """The module a node belongs to; for a parameter read, the module that owns the parameter."""
    path = module_path_of(node)
    if path in EMPTY_STACK_MARKERS:
        path = ""
    if not path and node.op == "get_attr":
        owner = str(node.target).rpartition(".")[0]
        prefix = adapters.ROOT + "."
        path = owner[len(prefix):] if owner.startswith(prefix) else owner
    return path


def node_shape(node: Node) -> tuple | None:
    """The output shape, with symbolic dims as their names ('s0'); None if not a tensor."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in val.shape)


def node_dtype(node: Node) -> str | None:
    val = node.meta.get("val")
    return str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None


def inserted_by(node: Node) -> str | None:
    """The pass that inserted `node`, or None for a node of the captured graph."""
    tag = provenance(node)
    return None if tag is None else tag.get("pass")


def format_shape(shape: tuple | None, dtype: str | None = None) -> str:
    if shape is None:
        return "-"
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
             "bool": "bool", "uint8": "u8", "int8": "i8"}
    prefix = short.get(dtype, dtype or "")
    return f"{prefix}[{', '.join(map(str, shape))}]"


def op_name(node: Node) -> str:
    if node.op == "call_function":
        return str(node.target).replace("torch.ops.", "")
    return node.op if node.op in ("placeholder", "output") else f"{node.op} {node.target}"


def format_node(node: Node) -> str:
    """One line: `name = op(args) -> f32[s0, s1, 64]`, parameters shown by name."""
    args = ", ".join([_format_arg(a) for a in node.args] + [f"{k}={_format_arg(v)}" for k, v in node.kwargs.items()])
    shape = format_shape(node_shape(node), node_dtype(node))
    if node.op == "get_attr":  # read by target in the lines that use it, so its node name adds nothing
        return f"param {node.target}  {shape}"
    return f"{node.name} = {op_name(node)}({args})  {shape}"


def _format_arg(arg) -> str:
    if isinstance(arg, Node):
        return str(arg.target) if arg.op == "get_attr" else arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a) for a in arg)
        return f"[{inner}]"
    return repr(arg)


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
    """A networkx.DiGraph: one node per graph node (by name), an edge per data dependency."""
    import networkx as nx

    chosen = select_nodes(gm, scope)
    names = {n.name for n in chosen}
    graph = nx.DiGraph()
    for node in chosen:
        tag = provenance(node) or {}
        graph.add_node(node.name, op=node.op, target=str(node.target), module_path=node_module_path(node),
                       shape=node_shape(node), dtype=node_dtype(node), inserted_by=tag.get("pass"),
                       method=tag.get("method"), site=tag.get("site"))
    for node in chosen:
        for source in node.all_input_nodes:
            if source.name in names:
                graph.add_edge(source.name, node.name)
    return graph


# -- diff ----------------------------------------------------------------------------------
@dataclass
class SiteChange:
    """What the passes did around one site: its original op, the nodes they inserted, who reads them."""

    site: str
    original: Node | None  # the site's op node in the captured graph, if it is still there
    inserted: list[Node]
    readers: list[Node]  # original nodes that now read an inserted node (they read `original` before)

    def signature(self) -> tuple:
        """What makes two sites' changes the same rewrite (used to fold repeated layers)."""
        return (op_name(self.original) if self.original is not None else None,
                node_shape(self.original) if self.original is not None else None,
                tuple((_inserted_by_label(provenance(n)), op_name(n) if n.op != "get_attr" else "get_attr",
                       node_shape(n))
                      for n in self.inserted))


def site_changes(gm: GraphModule, sites, scope: str | None = None) -> list[SiteChange]:
    """Inserted nodes grouped by the site they serve (or their module path), in graph order."""
    site_nodes = {s.path: s.node for s in sites}
    by_name = {n.name: n for n in gm.graph.nodes}
    groups: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        tag = provenance(node)
        if tag is None:
            continue
        key = tag.get("site") or node_module_path(node) or f"({tag.get('pass')})"
        groups.setdefault(key, []).append(node)
    changes = []
    for key, inserted in groups.items():
        if not in_scope(key, scope):
            continue
        members = set(inserted)
        readers = [u for n in inserted for u in n.users if u not in members and provenance(u) is None]
        changes.append(SiteChange(site=key, original=by_name.get(site_nodes.get(key, "")), inserted=inserted,
                                  readers=list(dict.fromkeys(readers))))
    return changes


def diff_text(gm: GraphModule, sites, records, scope: str | None = None) -> str:
    """The graph before vs after, grouped by site; repeated layers with the same rewrite are folded."""
    from .report import group_paths

    if scope is not None:
        select_nodes(gm, scope)  # a scope that names nothing is an error, not an empty diff
    changes = site_changes(gm, sites, scope)
    lines = [_diff_header(gm, records, changes, scope)]
    by_signature: dict[tuple, list[SiteChange]] = {}
    for change in changes:
        by_signature.setdefault(change.signature(), []).append(change)
    for group in by_signature.values():
        by_site = {c.site: c for c in group}
        for label, members in group_paths([c.site for c in group]):
            lines += [""] + _site_block(label, by_site[members[0]], len(members))
    if not changes:
        lines += ["", "no nodes inserted" + (f" under {scope!r}" if scope else "")]
    return "\n".join(lines)


def _diff_header(gm: GraphModule, records, changes: list[SiteChange], scope: str | None) -> str:
    original_now = sum(1 for n in gm.graph.nodes if provenance(n) is None)
    captured = records[0].nodes_before if records else original_now
    inserted = sum(len(c.inserted) for c in changes)
    where = f" under {scope!r}" if scope else ""
    removed = captured - original_now
    return (f"graph: {captured:,} nodes captured -> {len(gm.graph.nodes):,} now ({removed:,} original removed); "
            f"{inserted:,} inserted at {_plural(len(changes), 'site')}{where}")


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" + ("" if count == 1 else "s")


def _inserted_by_label(tag: dict) -> str:
    """`insert_lora[0] (lora)`: the pass, the spec entry it ran for, and the adapter slot."""
    entry = f"[{tag['entry']}]" if tag.get("entry") is not None else ""
    return f"{tag.get('pass')}{entry} ({tag.get('slot') or tag.get('method')})"


def _site_block(label: str, change: SiteChange, count: int) -> list[str]:
    passes = ", ".join(dict.fromkeys(_inserted_by_label(provenance(n)) for n in change.inserted))  # graph order
    head = f"{label}    by {passes}"
    if count > 1:
        head += f"    [{count} sites, same rewrite; shown: {change.site}]"
    original = change.original
    members = set(change.inserted)
    rewired = original is not None and any(a in members for a in original.all_input_nodes)
    readers = [r for r in change.readers if r is not original]
    lines = [head]
    if original is None:
        lines += ["  before  (no site op: nodes added at this module)", "  after"]
    elif rewired:
        # The op now reads inserted nodes in place of inputs it had before; what those were is not
        # kept in the graph, so no "before" line is made up.
        inputs = [_format_arg(a) for a in original.all_input_nodes if a in members]
        lines += [f"  after   {format_node(original)}",
                  f"          now reads inserted {', '.join(inputs)} in place of its original inputs"]
    else:
        lines.append(f"  before  {format_node(original)}")
        if readers:
            lines.append(f"          read by {', '.join(r.name for r in readers)}")
        lines.append(f"  after   {format_node(original)}")
    lines += [f"        + {format_node(n)}" for n in change.inserted]
    if readers:
        outputs = sorted({n.name for n in change.inserted for u in n.users if u in readers})
        lines.append(f"          {', '.join(r.name for r in readers)} now read {', '.join(outputs)}")
    return lines

"""DOT text for a compiled graph (inserted nodes coloured by method, or by pass for a pass with no
method such as quantize_base) and rendering via graphviz.

Nodes are nested in clusters that follow the module tree below the scope, so one layer of a
32-layer model reads as attention / MLP boxes with the adapters visibly beside their sites.
"""

from __future__ import annotations

import shutil
import subprocess
import zlib
from pathlib import Path

from torch.fx import GraphModule, Node

from peftc.core.files import atomic_file
from peftc.errors import GraphvizNotFoundError
from peftc.inspect.graph_view import select_nodes
from peftc.ir.graph_edit import provenance
from peftc.ir.node_text import node_module_path, op_name, value_text
from peftc.ir.shapes import LEGEND, has_dynamic, node_shape

# graphviz colour names, so the legend reads as words
METHOD_COLOURS = {"lora": "sandybrown", "dora": "salmon", "adapter": "mediumaquamarine", "ia3": "khaki",
                  "prompt": "darkseagreen", "prefix": "lightblue", "loha": "plum", "lokr": "thistle",
                  "vera": "pink", "mask": "lightsteelblue", "quantize_base": "powderblue"}
SPARE_COLOURS = ("palegreen", "gold", "lightskyblue", "orange", "aquamarine", "orchid")
SHAPES = {"placeholder": "invhouse", "output": "house", "get_attr": "cylinder"}
RENDER_FORMATS = ("svg", "png", "pdf")
INSTALL_HINT = ("install graphviz: `apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) "
                "or `conda install -c conda-forge graphviz`; "
                "or save cm.to_dot() to a .dot file and render it elsewhere")


def method_colour(method: str) -> str:
    """A fixed colour per known method; other names get a stable colour from their hash."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return SPARE_COLOURS[zlib.crc32(method.encode()) % len(SPARE_COLOURS)]


def to_dot(gm: GraphModule, scope: str | None = None) -> str:
    """DOT text: one node per graph node in `scope`, edges between them, clusters per module."""
    nodes = select_nodes(gm, scope)
    names = {n.name for n in nodes}
    methods = sorted({_colour_key(provenance(n)) for n in nodes if provenance(n) is not None})
    legend = _legend(scope, methods) + (f"\n{LEGEND}" if has_dynamic(node_shape(n) for n in nodes) else "")
    lines = ["digraph peftc {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             f"  label={_quote(legend)}; labelloc=t; fontname=Helvetica;"]
    lines += _clusters(nodes, scope)
    for node in nodes:
        for source in node.all_input_nodes:
            if source.name in names:
                lines.append(f"  {_quote(source.name)} -> {_quote(node.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _colour_key(tag: dict) -> str:
    """What an inserted node is coloured by: its method, else the pass that inserted it."""
    return tag.get("method") or tag.get("pass") or "inserted"


def _legend(scope: str | None, methods: list[str]) -> str:
    where = scope if scope else "whole model"
    coloured = ", ".join(f"{m} = {method_colour(m)}" for m in methods) or "none"
    return f"peftc graph: {where}   (inserted nodes: {coloured}; grey = original)"


def _clusters(nodes: list[Node], scope: str | None) -> list[str]:
    """Node statements nested in one cluster per module below the scope (the tree, depth-first)."""
    tree: dict = {"nodes": [], "children": {}}
    for node in nodes:
        branch = tree
        for part in _relative_parts(node_module_path(node), scope):
            branch = branch["children"].setdefault(part, {"nodes": [], "children": {}})
        branch["nodes"].append(node)
    return _emit(tree, prefix="", depth=1)


def _relative_parts(path: str, scope: str | None) -> list[str]:
    if scope and not set("*?[") & set(scope) and (path == scope or path.startswith(scope + ".")):
        path = path[len(scope):].lstrip(".")
    return [p for p in path.split(".") if p]


def _emit(branch: dict, prefix: str, depth: int) -> list[str]:
    pad = "  " * depth
    lines = [pad + _node_statement(n) for n in branch["nodes"]]
    for name, child in branch["children"].items():
        path = f"{prefix}.{name}" if prefix else name
        # A module whose only content is one submodule is folded into it: fewer empty boxes.
        if not child["nodes"] and len(child["children"]) == 1:
            (only, grandchild), = child["children"].items()
            lines += _emit({"nodes": [], "children": {f"{name}.{only}": grandchild}}, prefix, depth)
            continue
        lines.append(f"{pad}subgraph {_quote('cluster_' + path)} {{")
        lines.append(f"{pad}  label={_quote(name)}; style=rounded; color=\"#999999\"; fontsize=11;")
        lines += _emit(child, path, depth + 1)
        lines.append(pad + "}")
    return lines


def _node_statement(node: Node) -> str:
    tag = provenance(node)
    label = f"{_title(node)}\n{value_text(node)}"
    attrs = {"label": label, "shape": SHAPES.get(node.op, "box"), "style": "rounded,filled"}
    if tag is not None:
        attrs["fillcolor"] = method_colour(_colour_key(tag))
        attrs["tooltip"] = f"inserted by {tag.get('pass')} for {tag.get('site')}"
    else:
        attrs["fillcolor"] = "gray93"
    if node.op in ("get_attr", "placeholder", "output"):
        attrs["style"] = "filled"
    body = ", ".join(f"{k}={_quote(v)}" for k, v in attrs.items())
    return f"{_quote(node.name)} [{body}];"


def _title(node: Node) -> str:
    """`q_proj.weight` for a parameter; the node name, and its op when the name does not say it."""
    if node.op == "get_attr":
        return ".".join(str(node.target).split(".")[-2:])
    if node.op != "call_function":
        return node.name
    op = op_name(node).replace("aten.", "").replace(".default", "")
    return node.name if node.name.startswith(op.split(".")[0]) else f"{node.name}\n{op}"


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# -- rendering -----------------------------------------------------------------------------
def render(dot_text: str, path, format: str | None = None) -> Path:
    """Write `dot_text` rendered to `path` (format from its suffix: .svg, .png, .pdf) with graphviz."""
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in RENDER_FORMATS:
        raise ValueError(f"render: cannot tell the image format from {str(path)!r}; "
                         f"use a name ending in {', '.join('.' + f for f in RENDER_FORMATS)} or pass format=")
    program = shutil.which("dot")
    if program is None:
        raise GraphvizNotFoundError(f"render needs the graphviz 'dot' program, which is not on PATH; {INSTALL_HINT}")
    with atomic_file(path) as tmp:  # a failed render leaves no half-written image
        done = subprocess.run([program, f"-T{fmt}", "-o", str(tmp)], input=dot_text.encode(),
                              capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"graphviz 'dot' failed ({done.returncode}): {done.stderr.decode().strip()[:500]}")
    return path

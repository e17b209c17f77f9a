"""report(): what the compiler did, built from the passes' own records (never re-derived)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from peftc.capture.export import COPIED_LAYERS
from peftc.capture.specialize import DERIVED_REMOVED
from peftc.core.paths import group_paths
from peftc.inspect.graph_view import in_scope, select_nodes
from peftc.ir import adapters, quantized
from peftc.ir.shapes import LEGEND, Shape, node_shape
from peftc.spec.methods import METHODS


@dataclass
class Report:
    passes: list[dict] = field(default_factory=list)
    sites: list[dict] = field(default_factory=list)
    totals: dict = field(default_factory=dict)
    methods: list[dict] = field(default_factory=list)  # one row per spec entry: sites, params, merge
    adapters: list[dict] = field(default_factory=list)  # served / multi-trained models: one row per adapter

    @classmethod
    def build(cls, cm, scope: str | None = None) -> "Report":
        """From the pipeline's records; `scope` keeps the site rows under one module path."""
        if scope:
            select_nodes(cm.flat_graph_module, scope)  # a scope that names nothing is an error, not an empty table
        sites_by_path = {s.path: s for s in cm.sites}
        nodes = {n.name: n for n in cm.flat_graph_module.graph.nodes}
        per_site: dict[str, dict] = {}
        for record in cm.records:
            if record.method is None:
                continue
            for path in record.sites:
                row = per_site.get(path) or per_site.setdefault(path, _site_row(sites_by_path.get(path), nodes, path))
                row["methods"].append(record.method)
            for name, numel in record.params_added.items():
                path = _site_of(name, per_site)
                if path is not None:
                    per_site[path]["adapter_params"] += numel
        adapter_rows = _adapter_rows(cm, scope)
        for adapter in adapter_rows:  # multi-adapter plans: a site row names every adapter acting there
            for path in adapter["sites"]:
                row = per_site.get(path) or per_site.setdefault(path, _site_row(sites_by_path.get(path), nodes, path))
                row["methods"].append(f"{adapter['method']} ({adapter['name']})")
                row["adapter_params"] += adapter["site_params"][path]
        rows = [row for path, row in per_site.items() if in_scope(path, scope)]
        return cls(passes=[_pass_row(r) for r in cm.records], sites=rows, totals=_totals(cm),
                   methods=_method_rows(cm), adapters=adapter_rows)

    def to_dict(self) -> dict:
        return {"passes": self.passes, "sites": self.sites, "totals": self.totals, "methods": self.methods,
                "adapters": self.adapters}

    def __str__(self) -> str:
        t = self.totals
        by_method = ", ".join(f"{m} {n:,}" for m, n in t["adapter_params_by_method"].items())
        lines = [
            f"trainable params  {t['trainable_params']:,} / {t['total_params']:,} "
            f"({100 * t['trainable_fraction']:.4f}%)",
            f"adapter params    {t['adapter_params']:,}" + (f" ({by_method})" if by_method else "")
            + f", {t['adapter_bytes']:,} bytes",
            "base bytes        " + ", ".join(f"{k} {v:,}" for k, v in t["base_bytes_by_dtype"].items()),
            f"graph nodes       {t['graph_nodes_captured']:,} captured -> {t['graph_nodes']:,}",
            *[f"capture           {copied} (compile(..., copy_layers=False) traces every layer)"
              for copied in t.get("copied_layers", [])],
            *_quantized_line(t.get("quantized_base")),
            "",
            _table(["#", "pass", "time ms", "changed", "sites", "params added", "nodes +/-"],
                   [[p["index"], p["name"] + (f"[{p['entry']}]" if p["entry"] is not None else ""),
                     f"{1000 * p['seconds']:.1f}", "yes" if p["modified"] else "no", p["sites"],
                     f"{p['params_added']:,}", f"+{p['nodes_inserted']} -{p['nodes_removed']}"]
                    for p in self.passes]),
            "",
            _table(["module path", "op", "shape in -> out", "methods", "adapter params"],
                   _grouped_site_rows(self.sites)) if self.sites else "no sites rewritten",
            *_shape_legend(self.sites),
        ]
        if self.methods:
            lines += ["", _table(["entry", "method", "family", "sites", "params", "on merge"],
                                 [[m["entry"], m["method"], m["family"], _site_labels(m["sites"]), f"{m['params']:,}",
                                   m["merge"]] for m in self.methods])]
        if self.adapters:
            lines += ["", _table(["id", "adapter", "method", "sites", "params"],
                                 [[a["id"], a["name"], a["method"], _site_labels(a["sites"]), f"{a['params']:,}"]
                                  for a in self.adapters])]
        lines += [f"{p['name']} touched: " + ", ".join(label for label, _ in group_paths(p["touched"]))
                  for p in self.passes if p["method"] is None and p["touched"]]
        notes = [n for p in self.passes for n in p["notes"]]
        if notes:
            lines += [""] + [f"note: {n}" for n in notes]
        return "\n".join(lines)

    __repr__ = __str__


def _pass_row(record) -> dict:
    return {
        "index": record.index, "name": record.name, "method": record.method, "entry": record.entry_index,
        "seconds": round(record.seconds, 6), "modified": record.modified, "sites": len(record.sites),
        "touched": list(record.sites),
        "params_added": sum(record.params_added.values()),
        "nodes_added": record.nodes_after - record.nodes_before,  # net: inserted - removed
        "nodes_inserted": record.nodes_after - record.nodes_before + len(record.erased),
        "nodes_removed": len(record.erased),
        "notes": list(record.notes),
    }


def _site_row(site, nodes: dict, path: str) -> dict:
    """A site's facts; shapes come from the site op's own metadata (None if it was erased).

    Attention-level methods (prefix) touch module paths that are not weight sites: an "attention" row.
    """
    if site is None:
        return {"path": path, "module_path": path, "op": "attention", "kind": "attention", "in_features": None,
                "out_features": None, **_json_shape("in", None), **_json_shape("out", None), "methods": [],
                "adapter_params": 0}
    node = nodes.get(site.node_name)
    x = node.args[site.input_index] if node is not None and len(node.args) > site.input_index else None
    return {"path": site.path, "module_path": site.module_path, "op": site.op, "kind": site.kind,
            "in_features": site.in_features, "out_features": site.out_features,
            **_json_shape("in", node_shape(x) if hasattr(x, "meta") else None),
            **_json_shape("out", node_shape(node) if node is not None else None),
            "methods": [], "adapter_params": 0}


def _shape_legend(sites: list[dict]) -> list[str]:
    """The line that says what `*` means, where a shape in the table has one."""
    return [f"shapes: {LEGEND}"] if any(s["in_dynamic"] or s["out_dynamic"] for s in sites) else []


def _site_labels(paths: list[str]) -> str:
    return ", ".join(label for label, _ in group_paths(paths)) or "-"


def _method_rows(cm) -> list[dict]:
    """Per spec entry: every site it touched, the parameters it added, and what merged() does with it."""
    rows = []
    for record in cm.records:
        if record.method is None or record.entry_index is None:
            continue
        method = METHODS[record.method]
        folds = method.fold is not None and not getattr(cm.spec.adapters[record.entry_index], "gate", False)
        rows.append({"entry": record.entry_index, "method": record.method, "family": method.family,
                     "sites": list(record.sites), "params": sum(record.params_added.values()),
                     "merge": "folded into weights" if folds else "kept as graph ops"})
    return rows


def _adapter_rows(cm, scope: str | None) -> list[dict]:
    """Per adapter of a multi-adapter plan (serve_adapters, train_adapters): its method and the sites
    the multi-adapter passes rewrote for it (from their records), with its own tensors' sizes."""
    serving = getattr(getattr(cm, "plan", None), "serving", None)
    if serving is None:
        return []
    touched = {path for record in cm.records for path in record.sites}
    rows = []
    for index, adapter in enumerate(serving.adapters):
        sites = sorted(p for p in adapter.sites if p in touched and in_scope(p, scope))
        site_params = {p: sum(t.numel() for t in _site_tensors(adapter.sites[p])) for p in sites}
        rows.append({"id": index, "name": adapter.name, "method": adapter.method, "sites": sites,
                     "params": sum(site_params.values()), "site_params": site_params})
    return rows


def _site_tensors(site) -> list[torch.Tensor]:
    tensors = [site.input_scale, site.output_scale, site.magnitude, site.prompt]
    if site.prefix is not None:
        tensors += [site.prefix.key, site.prefix.value]
    if site.lora is not None:
        tensors += [site.lora.a, site.lora.b]
    if site.bottleneck is not None:
        b = site.bottleneck
        tensors += [b.down, b.down_bias, b.up, b.up_bias]
    return [t for t in tensors if t is not None]


def _json_shape(side: str, shape: Shape | None) -> dict:
    """`in_shape` (ints: the example inputs' sizes) and `in_dynamic` (which of those dims vary)."""
    if shape is None:
        return {f"{side}_shape": None, f"{side}_dynamic": None}
    return {f"{side}_shape": list(shape.sizes), f"{side}_dynamic": list(shape.dynamic)}


def _quantized_line(q: dict | None) -> list[str]:
    if not q:
        return []
    return [f"quantized base: {'+'.join(q['formats'])}, {q['weights']} weights, {q['params']:,} params in "
            f"{q['bytes']:,} bytes ({q['ratio_vs_fp32']:.3f}x fp32, scales included)"]


def _site_of(param_name: str, per_site: dict) -> str | None:
    best = None
    for path in per_site:
        if param_name.startswith(path + ".") and (best is None or len(path) > len(best)):
            best = path
    return best


def _totals(cm) -> dict:
    seen: set[int] = set()
    total = trainable = 0
    base_bytes: dict[str, int] = {}
    adapter_ids = {id(p) for p in getattr(cm.flat_graph_module, adapters.ROOT).parameters()}
    adapter_bytes = adapter_params = 0
    for _, tensor in list(cm.flat_graph_module.named_parameters()) + list(cm.flat_graph_module.named_buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        if id(tensor) in adapter_ids:
            adapter_bytes += nbytes
            adapter_params += tensor.numel()
        else:
            key = str(tensor.dtype).replace("torch.", "")
            base_bytes[key] = base_bytes.get(key, 0) + nbytes
        if isinstance(tensor, torch.nn.Parameter):
            total += tensor.numel()
            trainable += tensor.numel() if tensor.requires_grad else 0
    by_method: dict[str, int] = {}
    for record in cm.records:
        if record.method is not None:
            by_method[record.method] = by_method.get(record.method, 0) + sum(record.params_added.values())
    quantized_base = quantized.summary(cm.flat_graph_module)  # packed weights are buffers: count them here
    total += quantized_base["params"] if quantized_base else 0
    return {"trainable_params": trainable, "total_params": total, "quantized_base": quantized_base,
            "trainable_fraction": trainable / total if total else 0.0,
            "adapter_params": adapter_params, "adapter_params_by_method": by_method,
            "adapter_bytes": adapter_bytes, "base_bytes_by_dtype": base_bytes,
            "graph_nodes_captured": _captured_nodes(cm),
            "graph_nodes": len(cm.flat_graph_module.graph.nodes),
            "copied_layers": list(cm.flat_graph_module.meta.get(COPIED_LAYERS, []))}


def _captured_nodes(cm) -> int:
    """Nodes of the graph as captured: of a graph derived from a superset capture, those derivation kept."""
    if not cm.records:
        return len(cm.flat_graph_module.graph.nodes)
    return cm.records[0].nodes_before - cm.flat_graph_module.meta.get(DERIVED_REMOVED, 0)


def _grouped_site_rows(sites: list[dict]) -> list[list[Any]]:
    """One row per set of sites that differ only in their layer number."""
    by_path = {s["path"]: s for s in sites}
    rows = []
    signature_groups: dict[tuple, list[str]] = {}
    for s in sites:
        sig = (s["op"], _shape_text(s["in_shape"], s["in_dynamic"]), _shape_text(s["out_shape"], s["out_dynamic"]),
               s["in_features"],
               s["out_features"], tuple(s["methods"]), s["adapter_params"])
        signature_groups.setdefault(sig, []).append(s["path"])
    for sig, paths in signature_groups.items():
        for label, members in group_paths(paths):
            s = by_path[members[0]]
            shapes = (f"{_shape_text(s['in_shape'], s['in_dynamic'])} -> "
                      f"{_shape_text(s['out_shape'], s['out_dynamic'])}" if s["out_shape"] is not None
                      else "-" if s["in_features"] is None
                      else f"{s['in_features']} -> {s['out_features']} features")
            each = f"{s['adapter_params']:,}" + (" each" if len(members) > 1 else "")
            rows.append([label, s["op"], shapes, "+".join(s["methods"]), each])
    return rows


def _shape_text(shape: list | None, dynamic: list | None) -> str:
    return "-" if shape is None else str(Shape(tuple(shape), tuple(dynamic or ())))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])

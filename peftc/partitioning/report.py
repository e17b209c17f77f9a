"""part.report(): the cut, from the schedule the partition runs — per layer, what crosses, its shape
and its bytes per token; and, with Kill-and-Revive, which sites are active.

Bytes per token count the static dims of a crossing tensor (the dynamic ones are batch and
sequence). Forward sends each row's tensor in its direction; backward sends its gradient the
other way, except the site inputs of exchange 0 (nothing before them needs a gradient).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from peftc.ir.shapes import LEGEND, Shape
from peftc.partitioning.program import Programs

LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


@dataclass
class PartitionReport:
    rows: list[dict] = field(default_factory=list)  # one per crossing value
    layers: list[dict] = field(default_factory=list)  # one per layer: exchanges, bytes per token each way
    sites: list[dict] = field(default_factory=list)  # one per adapter site: active or killed
    totals: dict = field(default_factory=dict)

    @classmethod
    def build(cls, programs: Programs, dead_sites=frozenset()) -> "PartitionReport":
        report = cls()
        for exchange in programs.cut.exchanges:
            for direction, names in (("to user", exchange.to_user), ("to base", exchange.to_base)):
                report.rows += [_row(programs, exchange.index, direction, name) for name in names]
        report.layers = _layers(report.rows)
        all_sites = sorted({programs.sites[n] for n in programs.to_base_names if programs.sites.get(n)})
        killable = {programs.sites[n] for n in programs.killable} - {
            programs.sites[n] for n in programs.to_base_names - programs.killable}
        report.sites = [{"site": s, "active": s not in dead_sites, "killable": s in killable} for s in all_sites]
        forward = {d: sum(r["bytes_per_token"] for r in report.rows if r["direction"] == d)
                   for d in ("to user", "to base")}
        report.totals = {"exchanges": len(programs.cut.exchanges), "crossing_values": len(report.rows),
                         "forward_bytes_per_token": forward,
                         "backward_bytes_per_token": _backward_bytes(report.rows),
                         "active_sites": sum(s["active"] for s in report.sites), "sites": len(report.sites)}
        return report

    def to_dict(self) -> dict:
        return {"rows": self.rows, "layers": self.layers, "sites": self.sites, "totals": self.totals}

    def __str__(self) -> str:
        t = self.totals
        lines = [f"partition: {t['exchanges']} exchanges, {t['crossing_values']} crossing tensors; per token, "
                 f"forward {t['forward_bytes_per_token']['to user']:,} B to user + "
                 f"{t['forward_bytes_per_token']['to base']:,} B to base, backward "
                 f"{t['backward_bytes_per_token']['to user']:,} B to user + "
                 f"{t['backward_bytes_per_token']['to base']:,} B to base", ""]
        lines.append(_table(["layer", "exchanges", "to user B/token", "to base B/token"],
                            [[r["layer"], r["exchanges"], f"{r['to_user']:,}", f"{r['to_base']:,}"]
                             for r in self.layers]))
        lines.append("")
        lines.append(_table(["layer", "exchange", "direction", "tensor", "site", "shape", "dtype", "B/token"],
                            [[r["layer"], r["exchange"], r["direction"], r["name"], r["site"] or "-", r["shape"],
                              r["dtype"], f"{r['bytes_per_token']:,}"] for r in self.rows]))
        lines.append(LEGEND)
        if self.sites:
            active = [s["site"] for s in self.sites if s["active"]]
            killed = [s["site"] for s in self.sites if not s["active"]]
            lines.append(f"active sites: {len(active)} of {len(self.sites)}"
                         + (f"; killed: {', '.join(killed)}" if killed else ""))
        return "\n".join(lines)


def _row(programs: Programs, exchange: int, direction: str, name: str) -> dict:
    meta = programs.value_meta.get(name)
    shape = Shape.of(meta)
    site = programs.sites.get(name)
    match = LAYER.match(site or "")
    layer = match.group(1) if match else "-"
    shown = ",".join(part[len(layer) + 1:] if layer != "-" and part.startswith(layer + ".") else part
                     for part in site.split(",")) if site else None
    return {"layer": layer, "exchange": exchange, "direction": direction, "name": name, "site": shown,
            "shape": str(shape) if shape else type(meta).__name__, "dtype": str(getattr(meta, "dtype", "-")).replace(
                "torch.", ""), "bytes_per_token": _bytes_per_token(meta, shape)}


def _bytes_per_token(meta, shape: Shape | None) -> int:
    if shape is None:
        return 0
    static = [s for i, s in enumerate(shape.sizes) if i not in shape.dynamic and isinstance(s, int)]
    return math.prod(static) * meta.element_size() if isinstance(meta, torch.Tensor) else 0


def _backward_bytes(rows: list[dict]) -> dict:
    """Gradients go the other way; exchange 0's site inputs need none."""
    to_user = sum(r["bytes_per_token"] for r in rows if r["direction"] == "to base")
    to_base = sum(r["bytes_per_token"] for r in rows if r["direction"] == "to user" and r["exchange"] > 0)
    return {"to user": to_user, "to base": to_base}


def _layers(rows: list[dict]) -> list[dict]:
    layers: dict[str, dict] = {}
    for r in rows:
        entry = layers.setdefault(r["layer"], {"layer": r["layer"], "exchanges": set(), "to_user": 0, "to_base": 0})
        entry["exchanges"].add(r["exchange"])
        entry["to_user" if r["direction"] == "to user" else "to_base"] += r["bytes_per_token"]
    return [{**e, "exchanges": len(e["exchanges"])} for e in layers.values()]


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])

"""`peftc inspect MODEL --spec SPEC | --adapter DIR`: what the compiler did, as text, JSON, DOT or a picture."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from peftc.cli.common import (
    UsageError,
    add_model_argument,
    add_spec_arguments,
    check_output_path,
    compile_model,
    load_model,
    spec_from_args,
    write_output,
)

HELP = "show what the compiler did: the report and graph diff, or the graph as DOT / SVG / PNG"
FORMATS = ("text", "json", "dot", "svg", "png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_spec_arguments(parser)
    parser.add_argument("--format", choices=FORMATS, default="text",
                        help="text: report + diff (default); json: the report; dot/svg/png: the graph")
    parser.add_argument("--scope", metavar="PATH", help="a module path, e.g. model.layers.0 (or a glob)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="write here instead of stdout")


def run(args: argparse.Namespace) -> int:
    if args.format == "png" and args.out is None:
        raise UsageError("--format png needs --out FILE (a PNG is not written to the terminal)")
    if args.out is not None:
        check_output_path(args.out)
    spec = spec_from_args(args)
    cm = compile_model(load_model(args.model), spec, args.adapter)
    if args.format in ("svg", "png"):
        _render(cm, args)
    else:
        write_output(_text(cm, args), args.out)
    return 0


def _text(cm, args: argparse.Namespace) -> str:
    if args.format == "dot":
        return cm.to_dot(args.scope)
    report = cm.report(args.scope)
    if args.format == "json":
        data = {"model": args.model, "scope": args.scope, "spec": cm.spec.to_dict(), **report.to_dict()}
        return json.dumps(data, indent=2)
    return f"{report}\n\n{cm.diff(args.scope)}"


def _render(cm, args: argparse.Namespace) -> None:
    if args.out is not None:
        cm.render(args.out, args.scope, format=args.format)
        print(f"wrote {args.out}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = cm.render(Path(tmp) / "graph.svg", args.scope)
        write_output(path.read_text(), None)

"""The `peftc` command line (also `python -m peftc`).

Each subcommand is a module with `HELP`, `add_arguments(parser)` and `run(args) -> exit code`;
it is registered by one line in SUBCOMMANDS and shares its helpers from `peftc.cli.common`.
Errors a user can fix (bad spec, missing model, target that matches nothing, ...) print one
line and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from peftc import __version__
from peftc.cli.common import EXPECTED_ERRORS, one_line

EXIT_USAGE = 2

SUBCOMMANDS = {
    "inspect": "peftc.cli.inspect",
    "export": "peftc.cli.export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftc", description="peftc: a compiler for parameter-efficient fine-tuning")
    parser.add_argument("--version", action="version", version=f"peftc {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit code (0 ok, 2 for input the user must fix)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version, or argparse's own usage error (code 2)
        return int(done.code or 0)
    try:
        return int(args.run(args) or 0)
    except EXPECTED_ERRORS as err:
        print(f"peftc {args.command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE

"""`peftc export MODEL [--adapter DIR] --out model.onnx [--no-merge] [--quantize int8|int4]`.

MODEL is a local transformers model directory or `package.module:factory` (a function
returning an nn.Module). Steps that take over a second print their progress on stderr; bad
input ends with a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import CaptureError, CheckpointError, ExportError, SpecError

BAD_INPUT = 2
HELP = "export a model (with an adapter) to ONNX: merged, quantized, or with swappable LoRA adapters"


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help=HELP, description=HELP)
    add_arguments(parser)
    parser.set_defaults(func=run_export)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export options (peftc.cli registers subcommands through this)."""
    parser.add_argument("model", metavar="MODEL", help="local transformers model directory, or package.module:factory")
    parser.add_argument("--adapter", metavar="DIR", type=Path, help="adapter folder written by save_adapter")
    parser.add_argument("--out", metavar="FILE", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="keep LoRA weights as graph inputs and also write <out>.onnx_adapter")
    parser.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization (MatMulNBits)")
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size (power of two >= 16)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")


def run_export(args: argparse.Namespace) -> int:
    import peftc

    try:
        if not args.merge and args.adapter is None:
            raise ExportError("--no-merge needs --adapter DIR: there are no adapter weights to keep as inputs")
        with progress(f"loading {args.model}"):
            model = load_model(args.model)
        target = model
        if args.adapter is not None:
            target = compile_with_adapter(model, args.adapter)
        with progress(f"exporting to {args.out}" + (f" ({args.quantize})" if args.quantize else "")):
            path = peftc.export_onnx(target, args.out, merge=args.merge, quantize=args.quantize, opset=args.opset,
                                     block_size=args.block_size)
        if not args.merge:
            adapter_path = path.with_suffix(".onnx_adapter")
            peftc.export_adapter(target, adapter_path)
            print(f"wrote {adapter_path}", file=sys.stderr)
    except (ExportError, SpecError, CaptureError, CheckpointError, ModelLoadError) as err:
        print(f"peftc export: error: {err}", file=sys.stderr)
        return BAD_INPUT
    print(f"wrote {path}", file=sys.stderr)
    return 0


run = run_export  # the name peftc.cli looks up


def compile_with_adapter(model, adapter_dir: Path):
    import peftc
    from .checkpoint import SPEC_FILE

    spec_file = Path(adapter_dir) / SPEC_FILE
    if not spec_file.is_file():
        raise CheckpointError(f"--adapter {str(adapter_dir)!r}: no {SPEC_FILE}; expected a folder written by save_adapter")
    with progress("compiling"):
        cm = peftc.compile(model, peftc.Spec.load(spec_file))
    cm.load_adapter(adapter_dir)
    return cm.eval()


class ModelLoadError(ValueError):
    """MODEL names no loadable model."""


def load_model(spec: str):
    """A local transformers directory, or `package.module:factory`; the model is put in eval mode."""
    path = Path(spec)
    if path.is_dir():
        return _load_transformers_dir(path).eval()
    if ":" in spec and not path.exists():
        return _call_factory(spec).eval()
    raise ModelLoadError(f"MODEL {spec!r}: not a directory and not package.module:factory")


def _load_transformers_dir(path: Path):
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"MODEL {str(path)!r}: no config.json; expected a folder written by save_pretrained")
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel
    try:
        return model_class.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"MODEL {str(path)!r}: transformers cannot load it: {err}") from err


def _call_factory(spec: str):
    from torch import nn

    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(f"MODEL {spec!r}: cannot import {attr!r} from {module_name!r} ({err})") from err
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"MODEL {spec!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


@contextlib.contextmanager
def progress(message: str, threshold_s: float = 1.0) -> Iterator[None]:
    """Announce a step and report its time, unless it finishes within `threshold_s`."""
    start = time.monotonic()
    print(f"{message} ...", file=sys.stderr, flush=True)
    yield
    elapsed = time.monotonic() - start
    if elapsed >= threshold_s:
        print(f"{message}: done in {elapsed:.1f}s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (`python -m peftc.cli_export export ...`); the `peftc` CLI adds the same parser."""
    parser = argparse.ArgumentParser(prog="peftc")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

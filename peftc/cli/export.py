"""`peftc export MODEL [--adapter DIR] --out model.onnx [--no-merge] [--quantize int8|int4]`."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Iterator

from peftc.cli.common import (
    UsageError,
    add_model_argument,
    check_output_path,
    compile_model,
    load_model,
)
from peftc.codegen.onnx.export import check_opset

HELP = "export a model (with an adapter) to ONNX: merged, quantized, or with swappable LoRA adapters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--adapter", metavar="DIR", type=Path,
                        help="adapter folder: a peftc checkpoint (spec.json + weights) or a PEFT adapter directory")
    parser.add_argument("--out", metavar="FILE", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="keep LoRA weights as graph inputs and also write <out>.onnx_adapter")
    parser.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization (MatMulNBits)")
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size (power of two >= 16)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")


def run(args: argparse.Namespace) -> int:
    import peftc  # export_onnx loads the ONNX tooling on first use; `peftc inspect` never needs it

    if not args.merge and args.adapter is None:
        raise UsageError("--no-merge needs --adapter DIR: there are no adapter weights to keep as inputs")
    check_opset(args.opset)  # before the slow steps: a bad option fails at once, with nothing written
    check_output_path(args.out)
    with progress(f"loading {args.model}"):
        loaded = load_model(args.model)
    target = loaded.model.eval()
    if args.adapter is not None:
        with progress(f"compiling with the adapter in {args.adapter}"):
            target = compile_model(loaded, adapter_dir=args.adapter).eval()
    example = loaded.example_inputs if loaded.example_kwargs is None else loaded.example_kwargs
    with progress(f"exporting to {args.out}" + (f" ({args.quantize})" if args.quantize else "")):
        path = peftc.export_onnx(target, args.out, merge=args.merge, quantize=args.quantize, opset=args.opset,
                                 block_size=args.block_size, example_inputs=example)
    if not args.merge:
        adapter_path = path.with_suffix(".onnx_adapter")
        peftc.export_adapter(target, adapter_path)
        print(f"wrote {adapter_path}", file=sys.stderr)
    print(f"wrote {path}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def progress(message: str, threshold_s: float = 1.0) -> Iterator[None]:
    """Announce a step and report its time, unless it finishes within `threshold_s`."""
    start = time.monotonic()
    print(f"{message} ...", file=sys.stderr, flush=True)
    yield
    elapsed = time.monotonic() - start
    if elapsed >= threshold_s:
        print(f"{message}: done in {elapsed:.1f}s", file=sys.stderr, flush=True)

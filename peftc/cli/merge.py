"""`peftc merge MODEL --adapter DIR --out DIR`: a transformers model folder with the adapter folded in."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peftc.cli.common import UsageError, add_model_argument, compile_model, load_model, spec_from_args
from peftc.cli.export import progress

HELP = "fold an adapter into its base model and write the result as a transformers model folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--adapter", metavar="DIR", type=Path, required=True,
                        help="adapter folder: a peftc checkpoint (spec.json + weights) or a PEFT adapter directory")
    parser.add_argument("--spec", type=Path,
                        help="the training spec, for a folder transformers' Trainer wrote for a compiled model "
                             "(model.safetensors alone, no spec.json or adapter_config.json)")
    parser.add_argument("--out", metavar="DIR", type=Path, required=True,
                        help="the folder to write (config.json + safetensors weights, via save_pretrained)")


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    with progress(f"loading {args.model}"):
        loaded = load_model(args.model)
    if not hasattr(loaded.model, "save_pretrained"):
        raise UsageError(f"model {args.model!r}: {type(loaded.model).__name__} has no save_pretrained, so there is "
                         "no transformers folder to write; use peftc export for an ONNX file instead")
    with progress(f"compiling with the adapter in {args.adapter}"):
        cm = compile_model(loaded, spec=spec, adapter_dir=args.adapter)
    with progress(f"merging and writing {args.out}"):
        merged = cm.merge_and_unload()
        merged.save_pretrained(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0

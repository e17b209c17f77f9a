"""What every `peftc` subcommand shares: loading MODEL, the spec or an adapter, writing output.

MODEL is either a local transformers model directory (config.json + weights, loaded offline
with the class named in config.architectures) or `package.module:factory`, a callable that
returns a model or a `(model, example_inputs)` pair. Errors a user can fix from the command
line are in `EXPECTED_ERRORS`; `peftc.cli.main.main` prints them on one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftc.compiler.compile import compile
from peftc.core.files import atomic_write_text
from peftc.errors import (
    CallError,
    CaptureError,
    CheckpointError,
    ExportError,
    GraphvizNotFoundError,
    ScopeError,
    SpecError,
    UsageError,
)
from peftc.interop.from_peft import load_adapter_dir
from peftc.spec.parse import Spec

FACTORY_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


EXPECTED_ERRORS = (SpecError, CaptureError, CallError, CheckpointError, ExportError, ScopeError,
                   GraphvizNotFoundError, UsageError, OSError)  # OSError: a path that cannot be read or written


@dataclass
class LoadedModel:
    model: Any  # nn.Module
    example_inputs: tuple | None = None
    example_kwargs: dict | None = None


# -- arguments -------------------------------------------------------------------------------
def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="a local transformers model directory, or package.module:factory")


def add_spec_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--spec SPEC | --adapter DIR (a peftc checkpoint or a PEFT adapter directory: spec and weights)."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--spec", type=Path, help="spec file (.json, .yaml, .yml)")
    group.add_argument("--adapter", type=Path, metavar="DIR",
                       help="adapter folder: a peftc checkpoint (spec.json + weights) or a PEFT adapter directory")


# -- MODEL -----------------------------------------------------------------------------------
def load_model(ref: str) -> LoadedModel:
    """A model directory if `ref` is an existing path, else a `package.module:factory` reference."""
    path = Path(ref)
    if path.exists():
        return LoadedModel(load_pretrained_dir(path))
    if FACTORY_REF.fullmatch(ref):
        return load_factory(ref)
    raise FileNotFoundError(f"model {ref!r}: no such directory, and not a package.module:factory reference")


def load_pretrained_dir(path: Path):
    """A transformers model from a local folder, offline, with the class its config names."""
    if not (path / "config.json").is_file():
        raise UsageError(f"model {str(path)!r}: no config.json there; expected a folder written by "
                         "save_pretrained, or a package.module:factory reference")
    import transformers

    # A damaged folder fails inside transformers with any exception type (a wrong-typed config field
    # is a TypeError deep in the model's __init__); all of them are the folder's fault, not a peftc bug.
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:
        raise UsageError(f"model {str(path)!r}: config.json cannot be read: {one_line(err)}") from err
    model_class = architecture_class(config, path)
    try:
        return model_class.from_pretrained(path, local_files_only=True).eval()
    except Exception as err:
        raise UsageError(f"model {str(path)!r}: {model_class.__name__} cannot be built from its config.json "
                         f"and weights: {type(err).__name__}: {one_line(err)}") from err


def architecture_class(config, path: Path):
    """The class named by config.architectures (a transformers model class), else AutoModel."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        found = getattr(transformers, name, None)
        if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel):
            return found
    if names:
        raise UsageError(f"model {str(path)!r}: config.architectures {names} names no transformers model class "
                         f"in transformers {transformers.__version__}")
    return transformers.AutoModel


def load_factory(ref: str) -> LoadedModel:
    """Call `package.module:factory`; it returns a model, or (model, example_inputs)."""
    from torch import nn

    module_name, _, attr = ref.partition(":")
    module = _import_with_cwd(module_name, ref)
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory):
        raise UsageError(f"model {ref!r}: {module_name} has no callable {attr!r}")
    result = factory()
    model, example = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    if not isinstance(model, nn.Module):
        raise UsageError(f"model {ref!r}: the factory returned {type(model).__name__}; "
                         "expected an nn.Module or (model, example_inputs)")
    if example is None:
        return LoadedModel(model)
    if isinstance(example, dict):
        return LoadedModel(model, example_kwargs=example)
    return LoadedModel(model, example_inputs=example if isinstance(example, tuple) else (example,))


def _import_with_cwd(module_name: str, ref: str):
    """Import as `python -m` would: the current folder is searched too (console scripts omit it)."""
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"model {ref!r}: cannot import {module_name!r} ({err})") from err
    finally:
        if added:
            sys.path.remove(os.getcwd())


# -- spec and adapter --------------------------------------------------------------------------
def spec_from_args(args: argparse.Namespace):
    """The Spec from --spec (read before the model loads, so a bad spec fails fast); else None."""
    return Spec.load(args.spec) if getattr(args, "spec", None) is not None else None


def compile_model(loaded: LoadedModel, spec=None, adapter_dir: Path | None = None):
    """peftc.compile with `spec`, or with the adapter in `adapter_dir` (a peftc checkpoint or a PEFT
    adapter directory, spec and weights both from there), using the loaded model's example inputs."""
    inputs = {"example_inputs": loaded.example_inputs, "example_kwargs": loaded.example_kwargs}
    if adapter_dir is not None:
        if not Path(adapter_dir).is_dir():
            raise FileNotFoundError(f"adapter {str(adapter_dir)!r}: no such directory")
        return load_adapter_dir(loaded.model, adapter_dir, spec=spec, **inputs)
    if spec is None:
        raise UsageError("pass --spec SPEC or --adapter DIR")
    return compile(loaded.model, spec, **inputs)


# -- output ----------------------------------------------------------------------------------
def write_output(text: str, out: Path | None) -> None:
    """To --out if given (the folder is created), else to stdout."""
    if out is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    atomic_write_text(out, text, UsageError)  # a failure leaves nothing at --out
    print(f"wrote {out}", file=sys.stderr)


def check_output_path(out: Path) -> None:
    """Refuse an --out that can never be written, before any slow step runs."""
    if out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a directory; pass a file path inside it")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {str(out)!r}: {str(parent)!r} is a file, not a folder")
            return


def one_line(err: BaseException, limit: int = 600) -> str:
    """An error's message on one line (several-line messages are joined), at most `limit` characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."

"""Promise: a save is atomic in every window — the target holds the complete old or the complete new
version, whenever the saving process dies — and the next save of the target cleans up after it.

A forked child saves in a loop (an adapter checkpoint through save_adapter, a spec file through
Spec.save, a large file through the helper ONNX export writes with) alternating two versions,
and is SIGKILLed at a random moment; the test then reads each target back.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
import time
import types
from pathlib import Path

import pytest
import torch
from hypothesis import settings

import peftc
from families import MLP
from peftc.core import files
from peftc.runtime.checkpoint import read_adapter, save_adapter
from peftc.spec.parse import Spec

KILLS = max(8, settings().max_examples)  # ci: 12 kills; HYPOTHESIS_PROFILE=long: 400


def version_spec(version: int) -> Spec:
    return Spec.from_dict({"adapters": [{"method": "lora", "targets": ["fc1"], "r": version}]})


def fake_compiled(version: int) -> types.SimpleNamespace:
    """What save_adapter reads of a CompiledModel: its spec and adapter tensors (8 x 256 KiB, all `version`)."""
    tensors = {f"t{i}": torch.full((256, 256), float(version)) for i in range(8)}
    return types.SimpleNamespace(spec=version_spec(version), adapter_state_dict=lambda: tensors)


def save_forever(root: Path, ready) -> None:
    """The child: save two versions of every target in turn until it is killed."""
    versions = {v: fake_compiled(v) for v in (1, 2)}
    for n in itertools.count():
        version = 1 + n % 2
        save_adapter(versions[version], root / "adapter")
        version_spec(version).save(root / "spec.json")
        with files.atomic_file(root / "model.onnx") as tmp:  # what export_onnx writes through
            tmp.write_bytes(bytes([version]) * 2_000_000)
        if n == 1:
            ready.set()  # every target written once


def start_saver(root: Path):
    """A forked child (it shares the imports already loaded, so it starts at once) saving in a loop."""
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    proc = context.Process(target=save_forever, args=(root, ready), daemon=True)
    proc.start()
    return proc, ready


def assert_whole_version(root: Path) -> None:
    """Each target is one complete version: a checkpoint's spec and weights agree with each other."""
    spec, tensors = read_adapter(root / "adapter")
    version = spec.adapters[0].r
    assert version in (1, 2) and len(tensors) == 8
    assert all(bool((t == version).all()) for t in tensors.values())
    assert Spec.load(root / "spec.json").adapters[0].r in (1, 2)
    data = (root / "model.onnx").read_bytes()
    assert len(data) == 2_000_000 and data[0] in (1, 2) and data.count(data[0]) == len(data)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if files.TEMP_TAG in p.name)


def test_sigkill_at_random_points_never_loses_a_version(tmp_path):
    rng = random.Random(0)
    proc, ready = start_saver(tmp_path)
    assert ready.wait(60)
    for kill in range(KILLS + 1):
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        assert_whole_version(tmp_path)
        if kill < KILLS:
            proc, _ = start_saver(tmp_path)
            time.sleep(rng.uniform(0.0, 0.3))  # anywhere in a save of one of the three targets


def test_the_next_save_cleans_what_interrupted_saves_left(tmp_path):
    cm = peftc.compile(MLP(), {"adapters": [{"method": "lora", "targets": ["fc1"]}]},
                       example_inputs=(torch.randn(3, 16),))
    target = tmp_path / "adapter"
    cm.save_adapter(target)
    for name in (".adapter.peftc-abc.tmp", ".adapter.peftc-old", ".spec.json.peftc-x.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter.safetensors").write_bytes(b"half")
    (tmp_path / ".model.onnx.peftc-y.tmp").write_bytes(b"half")
    cm.save_adapter(target)
    cm.spec.save(tmp_path / "spec.json")
    with files.atomic_file(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"onnx")
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in target.iterdir()) == ["adapter.safetensors", "spec.json"]
    cm.load_adapter(target)


def test_a_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    cm = peftc.compile(MLP(), {"adapters": [{"method": "lora", "targets": ["fc1"]}]},
                       example_inputs=(torch.randn(3, 16),))
    target = tmp_path / "adapter"
    cm.save_adapter(target)
    old = (target / "adapter.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="No space"):
        cm.save_adapter(target)
    assert (target / "adapter.safetensors").read_bytes() == old and leftovers(tmp_path) == []


def test_without_an_exchange_call_the_old_checkpoint_survives_and_comes_back(tmp_path, monkeypatch):
    """Where the OS cannot swap two folders, a crash between the two renames is recovered by the next save."""
    cm = peftc.compile(MLP(), {"adapters": [{"method": "lora", "targets": ["fc1"]}]},
                       example_inputs=(torch.randn(3, 16),))
    target = tmp_path / "adapter"
    cm.save_adapter(target)
    old = (target / "adapter.safetensors").read_bytes()
    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def crash_after_the_first(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the two renames
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        cm.save_adapter(target)
    monkeypatch.setattr(os, "rename", real_rename)
    assert (files.old_copy(target) / "adapter.safetensors").read_bytes() == old  # whole, beside the target
    files.recover_dir(target)
    assert (target / "adapter.safetensors").read_bytes() == old
    cm.save_adapter(target)  # the fallback path, uninterrupted
    assert leftovers(tmp_path) == [] and read_adapter(target)[0] == cm.spec


def test_export_onnx_writes_atomically_and_cleans_leftovers(tmp_path):
    model = MLP().eval()
    leftover = tmp_path / ".model.onnx.peftc-k.tmp"
    leftover.write_bytes(b"half an export")
    path = peftc.export_onnx(model, tmp_path / "model.onnx", example_inputs=(torch.randn(3, 16),))
    assert path.stat().st_size > 0 and leftovers(tmp_path) == []
    before = path.read_bytes()
    with pytest.raises(peftc.ExportError, match="opset"):
        peftc.export_onnx(model, path, example_inputs=(torch.randn(3, 16),), opset=1)
    assert path.read_bytes() == before

"""Promise: the CLI never prints a traceback for bad input: exit 2, one line naming the problem, no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from families import FAMILIES
from peftc.cli.main import main

MLP = "cli_factories:tiny_mlp"
SPEC = {"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2}]}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code: int, out: str, err: str, command: str, fragment: str) -> None:
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith(f"peftc {command}: error: ") and fragment in err, err


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(SPEC))
    return path


@pytest.fixture(scope="module")
def broken_model_dir(tmp_path_factory) -> Path:
    """A saved transformers model whose config.json holds a field of the wrong type."""
    folder = tmp_path_factory.mktemp("model")
    FAMILIES["llama"].build().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_dir_with_a_wrong_typed_config_field(capsys, spec, broken_model_dir):
    assert_refused(*run_cli(capsys, "inspect", broken_model_dir, "--spec", spec), "inspect", "config.json")


@pytest.mark.parametrize("body, fragment", [
    ({"adapters": [{"method": ["lora"]}]}, "adapters[0].method"),
    ({"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2**31}]}, "adapters[0].r"),
])
def test_a_bad_spec_field(capsys, tmp_path, body, fragment):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(body))
    assert_refused(*run_cli(capsys, "inspect", MLP, "--spec", path), "inspect", fragment)


def test_a_spec_file_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_bytes("adapters: []".encode("utf-16"))
    assert_refused(*run_cli(capsys, "inspect", MLP, "--spec", path), "inspect", "not UTF-8")


def test_out_under_a_regular_file(capsys, tmp_path, spec):
    (tmp_path / "file").write_text("x")
    assert_refused(*run_cli(capsys, "inspect", MLP, "--spec", spec, "--out", tmp_path / "file" / "r.txt"),
                   "inspect", "is a file")
    assert_refused(*run_cli(capsys, "export", MLP, "--out", tmp_path / "file" / "m.onnx"), "export", "is a file")
    assert (tmp_path / "file").read_text() == "x"


def test_out_at_a_directory(capsys, tmp_path, spec):
    assert_refused(*run_cli(capsys, "export", MLP, "--out", tmp_path), "export", "is a directory")
    assert_refused(*run_cli(capsys, "inspect", MLP, "--spec", spec, "--out", tmp_path), "inspect", "is a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]


@pytest.mark.parametrize("opset", [1, 17, 99])
def test_an_opset_the_exporter_cannot_write(capsys, tmp_path, opset):
    out = tmp_path / "m.onnx"
    assert_refused(*run_cli(capsys, "export", MLP, "--out", out, "--opset", opset), "export", "opset")
    assert not out.exists()


def test_a_damaged_adapter_folder(capsys, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "spec.json").write_bytes(b"\xff\xfe not json")
    (folder / "adapter.safetensors").write_bytes(b"")
    assert_refused(*run_cli(capsys, "inspect", MLP, "--adapter", folder), "inspect", "spec.json")

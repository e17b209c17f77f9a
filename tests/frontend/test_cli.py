"""The `peftc` command line: `inspect` outputs and exit codes, MODEL loading, the subcommand table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pydot
import pytest

from peftc.cli import main as cli
from peftc.cli.common import load_model
from peftc.cli.main import main

TESTS = Path(__file__).parent.parent  # tests/: cli_factories.py lives there
MLP = "cli_factories:tiny_mlp"


def write_spec(path: Path, targets=("fc1",), **lora) -> Path:
    path.write_text(json.dumps({"adapters": [{"method": "lora", "targets": list(targets), "r": 2, **lora}]}))
    return path


@pytest.fixture
def spec(tmp_path) -> Path:
    return write_spec(tmp_path / "spec.json")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("peftc inspect: error: ") and fragment in err
    assert "Traceback" not in err


# -- outputs -----------------------------------------------------------------------------------
def test_inspect_text_shows_report_and_diff(capsys, spec):
    code, out, err = run_cli(capsys, "inspect", MLP, "--spec", spec)
    assert code == 0 and err == ""
    assert "insert_lora[0]" in out and "fc1" in out and "+ param peftc.fc1.lora.A" in out


def test_inspect_json_is_the_report(capsys, spec):
    code, out, _ = run_cli(capsys, "inspect", MLP, "--spec", spec, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["model"] == MLP
    assert [s["path"] for s in data["sites"]] == ["fc1"]
    assert data["totals"]["adapter_params"] == 2 * (16 + 32)


def test_inspect_dot_with_scope_to_a_file(capsys, spec, tmp_path):
    out_file = tmp_path / "out" / "fc1.dot"
    code, out, err = run_cli(capsys, "inspect", MLP, "--spec", spec, "--format", "dot", "--scope", "fc1",
                             "--out", out_file)
    assert code == 0 and out == "" and str(out_file) in err
    (graph,) = pydot.graph_from_dot_data(out_file.read_text())
    assert "fc1" in graph.get_label()


@pytest.mark.skipif(shutil.which("dot") is None, reason="the graphviz `dot` program is not installed")
def test_inspect_svg_and_png(capsys, spec, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", MLP, "--spec", spec, "--format", "svg", "--scope", "fc1")
    assert code == 0 and "<svg" in out
    code, _, _ = run_cli(capsys, "inspect", MLP, "--spec", spec, "--format", "png", "--out", tmp_path / "g.png")
    assert code == 0 and (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")


def test_inspect_svg_without_graphviz_exits_2(capsys, spec, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `dot` program
    code, _, err = run_cli(capsys, "inspect", MLP, "--spec", spec, "--format", "svg")
    assert_one_line_error(code, err, "apt-get install graphviz")


def test_inspect_adapter_dir_loads_spec_and_weights(capsys, tmp_path):
    from families import FAMILIES

    import peftc

    family = FAMILIES["mlp"]
    cm = peftc.compile(family.build(), {"adapters": [{"method": "lora", "targets": ["fc2"], "r": 3}]},
                       example_inputs=family.example_inputs())
    cm.save_adapter(tmp_path / "ckpt")
    code, out, _ = run_cli(capsys, "inspect", MLP, "--adapter", tmp_path / "ckpt", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["spec"] == cm.spec.to_dict() and [s["path"] for s in data["sites"]] == ["fc2"]
    (tmp_path / "ckpt" / "spec.json").write_text("{not json")
    code, _, err = run_cli(capsys, "inspect", MLP, "--adapter", tmp_path / "ckpt")
    assert_one_line_error(code, err, "not valid JSON")
    code, _, err = run_cli(capsys, "inspect", MLP, "--adapter", tmp_path)
    assert_one_line_error(code, err, "neither a peftc checkpoint")


def test_inspect_a_peft_adapter_directory(capsys, tmp_path):
    from cli_factories import tiny_mlp
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_mlp()[0], LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"])).save_pretrained(tmp_path)
    code, out, _ = run_cli(capsys, "inspect", MLP, "--adapter", tmp_path, "--format", "json")
    data = json.loads(out)
    assert code == 0 and [s["path"] for s in data["sites"]] == ["fc1"]
    assert data["totals"]["adapter_params"] == 2 * (16 + 32)


# -- exit 2 with one line ------------------------------------------------------------------------
@pytest.mark.parametrize("model, spec_body, fragment", [
    (MLP, {"adapters": [{"method": "lora", "targets": ["fc1"], "r": 0}]}, "adapters[0].r"),
    (MLP, {"adapters": [{"method": "lora", "targets": ["fc9"]}]}, "'fc9' matches no module path"),
    (MLP, {"adapterz": []}, "spec.adapterz: unknown field"),
    ("./no/such/model", {"adapters": [{"method": "lora", "targets": ["fc1"]}]}, "no such directory"),
    ("cli_factories:missing", {"adapters": [{"method": "lora", "targets": ["fc1"]}]}, "no callable 'missing'"),
    ("no_such_module:f", {"adapters": [{"method": "lora", "targets": ["fc1"]}]}, "cannot import 'no_such_module'"),
    ("cli_factories:not_a_model", {"adapters": [{"method": "lora", "targets": ["fc1"]}]}, "returned str"),
])
def test_inspect_bad_input_exits_2(capsys, tmp_path, model, spec_body, fragment):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec_body))
    code, _, err = run_cli(capsys, "inspect", model, "--spec", spec_file)
    assert_one_line_error(code, err, fragment)


def test_inspect_missing_spec_file_scope_and_folder_without_config(capsys, spec, tmp_path):
    code, _, err = run_cli(capsys, "inspect", MLP, "--spec", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "does not exist")
    code, _, err = run_cli(capsys, "inspect", MLP, "--spec", spec, "--scope", "fc9")
    assert_one_line_error(code, err, "nearest: 'fc")
    code, _, err = run_cli(capsys, "inspect", tmp_path, "--spec", spec)
    assert_one_line_error(code, err, "no config.json")
    code, _, err = run_cli(capsys, "inspect", MLP, "--spec", spec, "--format", "png")
    assert_one_line_error(code, err, "--out")


def test_usage_errors_and_help(capsys, spec):
    assert main(["inspect", MLP]) == 2  # neither --spec nor --adapter
    assert "one of the arguments --spec --adapter is required" in capsys.readouterr().err
    assert main(["inspect", "--help"]) == 0 and "--scope PATH" in capsys.readouterr().out
    assert main([]) == 2


# -- MODEL from a transformers directory and from a factory ------------------------------------------
def test_inspect_llama_from_a_saved_directory_and_a_factory(capsys, tmp_path):
    from cli_factories import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "llama")
    loaded = load_model(str(tmp_path / "llama"))
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and not loaded.model.training
    spec_file = write_spec(tmp_path / "spec.json", targets=("q_proj", "v_proj"))
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "llama", "--spec", spec_file)
    assert code == 0 and "model.layers.{0..1}.self_attn.q_proj" in out
    code, out, _ = run_cli(capsys, "inspect", "cli_factories:tiny_llama", "--spec", spec_file,
                           "--scope", "model.layers.1")
    assert code == 0 and "model.layers.1.self_attn.v_proj" in out and "model.layers.0." not in out


# -- the subcommand table ------------------------------------------------------------------------
def test_a_subcommand_registers_with_one_table_line(capsys, monkeypatch):
    hello = types.ModuleType("peftc_hello")
    hello.HELP = "say hello"
    hello.add_arguments = lambda parser: parser.add_argument("name")
    hello.run = lambda args: print(f"hello {args.name}") or 0
    monkeypatch.setitem(sys.modules, "peftc_hello", hello)
    monkeypatch.setitem(cli.SUBCOMMANDS, "hello", "peftc_hello")
    assert main(["hello", "world"]) == 0 and capsys.readouterr().out == "hello world\n"


# -- the installed entry points ------------------------------------------------------------------
def test_python_dash_m_peftc(tmp_path):
    spec_file = write_spec(tmp_path / "spec.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([sys.executable, "-m", "peftc", "inspect", MLP, "--spec", str(spec_file), "--format", "json"],
                        cwd=TESTS, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["totals"]["adapter_params"] == 2 * (16 + 32)

"""Bad input: clear errors, and the user's model (and files) left exactly as they were."""

import pytest
import torch
from families import FAMILIES, compile_family, randomize_adapters
from torch import nn

import peftc
from peftc import CaptureError, CheckpointError, SpecError
from peftc.capture.export import capture


def model_state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            model.training, sorted(n for n, _ in model.named_modules()))


def assert_unchanged(model, before):
    state, grads, training, modules = model_state(model)
    assert {k: torch.equal(v, before[0][k]) for k, v in state.items()} == {k: True for k in state}
    assert grads == before[1]
    assert training == before[2]
    assert modules == before[3]


@pytest.mark.parametrize("spec,message", [
    ({"adapters": [{"method": "lora", "targets": ["q_prj"]}]}, "adapters[0].targets[0]: 'q_prj' matches no module path; nearest: 'model.layers.0.self_attn.q_proj'"),
    ({"adapters": [{"method": "lora", "targets": ["q_proj"]}], "trainable": ["*.bais"]}, "trainable[0]: '*.bais' matches no parameter name"),
    ({"adapters": [{"method": "lora", "targets": ["re:.*norm"]}]}, "adapters[0].targets[0]: 're:.*norm' matches no module path"),
])
def test_failed_compile_leaves_model_as_it_was(spec, message):
    model = FAMILIES["llama"].build()
    model.train()
    before = model_state(model)
    with pytest.raises(SpecError) as err:
        peftc.compile(model, spec)
    assert message in str(err.value)
    assert_unchanged(model, before)


def test_capture_error_keeps_export_reason_and_model():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if self.fc(x).sum() > 0:  # Python control flow on a tensor value: not capturable
                return x
            return -x

    model = DataDependent()
    before = model_state(model)
    with pytest.raises(CaptureError) as err:
        peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["fc"]}]}, example_inputs=(torch.randn(2, 4),))
    assert err.value.reason and "torch.export could not capture DataDependent" in str(err.value)
    assert isinstance(err.value.__cause__, Exception)
    assert_unchanged(model, before)


def test_a_forward_with_use_cache_returns_the_cache_and_leaves_the_model():
    """The original returns a DynamicCache; so does the compiled forward (peftc.runtime.forward_cache)."""
    family = FAMILIES["llama"]
    model = family.build().eval()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj"], "r": 2}]})
    randomize_adapters(cm)
    before = model_state(model)
    out = cm(**family.inputs(2, 5), use_cache=True)
    assert out.past_key_values.get_seq_length() == 5
    assert_unchanged(model, before)
    out = cm(**family.inputs(2, 5))  # the other calls still run their graphs
    assert out.logits.shape[:2] == (2, 5)


def test_a_capture_returning_a_cache_object_says_what_returns_one():
    """What still captures a forward with use_cache=True (a served model's) gets an error naming the way out."""
    family = FAMILIES["llama"]
    with pytest.raises(CaptureError, match=r"use_cache=True.*generate\(\.\.\.\).*use_cache=False"):
        capture(family.build(), (), {**family.inputs(2, 5), "use_cache": True})


def test_plain_model_without_inputs_is_a_clear_error():
    with pytest.raises(CaptureError, match="pass example_inputs"):
        peftc.compile(FAMILIES["mlp"].build(), {"adapters": [{"method": "lora", "targets": ["fc1"]}]})


def test_unknown_backend():
    with pytest.raises(SpecError, match="backend: expected one of"):
        compile_family(FAMILIES["mlp"], {"adapters": [{"method": "lora", "targets": ["fc1"]}]}, backend="tvm")


@pytest.fixture(scope="module")
def mlp_checkpoint(tmp_path_factory):
    family = FAMILIES["mlp"]
    _, cm = compile_family(family, {"adapters": [{"method": "lora", "targets": ["fc1", "fc2"], "r": 2}]})
    randomize_adapters(cm)
    path = tmp_path_factory.mktemp("ckpt") / "adapter"
    cm.save_adapter(path)
    return family, cm, path


def test_load_into_a_model_with_other_shapes_names_the_tensor(mlp_checkpoint, tmp_path):
    family, cm, path = mlp_checkpoint

    class Wider(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 40), nn.Linear(40, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    other = peftc.compile(Wider(), cm.spec, example_inputs=(torch.randn(2, 16),))
    with pytest.raises(CheckpointError, match=r"tensor 'fc1.lora.B': checkpoint shape \(32, 2\) != model shape \(40, 2\)"):
        other.load_adapter(path)


def test_load_with_another_spec_or_damaged_files(mlp_checkpoint, tmp_path):
    family, cm, path = mlp_checkpoint
    _, other = compile_family(family, {"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2}]})
    with pytest.raises(CheckpointError, match="different spec"):
        other.load_adapter(path)
    with pytest.raises(CheckpointError, match="has no adapter.safetensors"):
        cm.load_adapter(tmp_path)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "spec.json").write_text((path / "spec.json").read_text())
    data = (path / "adapter.safetensors").read_bytes()
    (damaged / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        cm.load_adapter(damaged)


def test_failed_save_leaves_nothing_behind(mlp_checkpoint, tmp_path, monkeypatch):
    family, cm, path = mlp_checkpoint
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        cm.save_adapter(tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    # An existing checkpoint survives a failed overwrite untouched.
    original = (path / "adapter.safetensors").read_bytes()
    with pytest.raises(OSError):
        cm.save_adapter(path)
    assert (path / "adapter.safetensors").read_bytes() == original
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]


def test_compile_on_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4}]})
    assert all(t.is_meta for t in cm.adapter_state_dict().values())
    assert len(cm.report().sites) == 4

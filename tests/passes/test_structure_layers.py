"""The layer-structured graph: each layer a module at its own path, one program per distinct layer."""

from __future__ import annotations

import copy

import pytest
import torch
from families import FAMILIES
from torch._dynamo.utils import counters

import peftc
from peftc.ir import layer_program
from peftc.ir.layer_program import CompiledLayer, compiled_layers

LORA = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}


def llama(layers: int, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def ids(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(batch * 31 + seq))


def compiled(model, backend: str = "torch"):
    cm = peftc.compile(model, {"adapters": [LORA]}, example_inputs=(ids(),), backend=backend)
    with torch.no_grad():  # non-zero adapters: the update must reach the output
        for p in cm.adapter_root.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    return cm


@pytest.fixture(scope="module")
def two_layer_compile():
    """(the user's 2-layer model, its compile, a deepcopy of that compile made before any test ran it): one
    compile (seconds of torch.export; a deepcopy runs none) for the tests that read it and the one that
    needs a compiled model no other test has called."""
    model = llama(2)
    cm = compiled(model)
    return model, cm, copy.deepcopy(cm)


@pytest.fixture(scope="module")
def two_layers(two_layer_compile):
    """(the user's 2-layer model, its compile) for the tests that only read it or run its graphs."""
    model, cm, _ = two_layer_compile
    return model, cm


def layer_calls(gm) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                       CompiledLayer)]


def test_each_layer_is_a_module_at_its_own_path_holding_its_parameters():
    model = llama(3)
    cm = compiled(model)
    paths = [f"model.layers.{i}" for i in range(3)]
    assert layer_calls(cm.graph_module) == paths  # one call per layer, in order
    assert isinstance(cm.model.layers, torch.nn.ModuleList) and len(cm.model.layers) == 3
    for i, path in enumerate(paths):
        layer = cm.get_submodule(path)
        assert isinstance(layer, CompiledLayer) and layer is cm.model.layers[i]
        own = dict(layer.named_parameters())
        original = dict(model.model.layers[i].named_parameters())
        assert own.keys() == original.keys()
        assert all(own[n].data_ptr() == original[n].data_ptr() for n in own)  # the user's memory, no copy
    functions = {id(p.function) for layer in compiled_layers(cm) for p in layer.programs.values()}
    assert len(functions) == 1  # identical layers share one code object


def test_parameter_names_read_like_the_original_model(two_layers):
    model, cm = two_layers
    base = {n for n, _ in cm.named_parameters() if not n.startswith("peftc.")}
    assert base == {n for n, _ in model.named_parameters()}
    adapters = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert adapters == {"peftc." + n for n in cm.adapter_state_dict()}


def test_the_structured_graph_computes_what_the_flat_graph_does(two_layers):
    _, cm = two_layers
    cm.train()
    args, kwargs = cm.example_call

    def run(gm):
        cm.zero_grad()
        logits = gm(*args, **kwargs).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in cm.named_parameters() if p.grad is not None}

    structured, flat = run(cm.graph_module), run(cm.flat_graph_module)
    torch.testing.assert_close(structured[0], flat[0], rtol=0, atol=0)
    assert structured[1].keys() == flat[1].keys() and len(flat[1]) == 8
    for name in flat[1]:
        torch.testing.assert_close(structured[1][name], flat[1][name], rtol=0, atol=0)


def test_a_new_call_signature_runs_the_same_layer_modules(two_layer_compile):
    _, _, cm = two_layer_compile  # the uncalled copy: one graph so far
    x = ids()
    # labels: a second plain graph (use_cache=False: a call returning the cache runs the flat cached graph)
    loss = cm(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    assert len(cm.graphs) == 2
    second = next(gm for gm in cm.graphs.values() if gm is not cm.graph_module)
    for path in layer_calls(second):
        assert second.get_submodule(path) is cm.get_submodule(path)
    grads = [p.grad for p in cm.adapter_root.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_train_and_eval_modes_reach_the_layer_programs():
    family = FAMILIES["gpt2"]  # dropout 0.1 inside every block
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": list(family.targets), "r": 4}]},
                       example_kwargs=family.inputs(2, 6))
    assert layer_calls(cm.graph_module)
    x = family.inputs(2, 6)
    cm.train()
    with torch.no_grad():
        assert not torch.equal(cm(**x).logits, cm(**x).logits)  # dropout on
        cm.eval()
        torch.testing.assert_close(cm(**x).logits, model(**x).logits)  # B = 0: the original, dropout off


def test_a_model_without_layer_stacks_runs_its_flat_graph():
    family = FAMILIES["mlp"]
    cm = peftc.compile(family.build(), {"adapters": [{"method": "lora", "targets": ["fc1"], "r": 2}]},
                       example_inputs=family.example_inputs())
    assert cm.graph_module is cm.flat_graph_module and not compiled_layers(cm)


def test_pickle_round_trip_rebuilds_the_layers(two_layers):
    import pickle
    _, cm = two_layers
    x = ids()
    with torch.no_grad():
        expected = cm(input_ids=x).logits
        again = pickle.loads(pickle.dumps(cm))
        assert isinstance(again.get_submodule("model.layers.1"), CompiledLayer)
        torch.testing.assert_close(again(input_ids=x).logits, expected)


def test_inductor_compiles_each_distinct_layer_once_not_once_per_layer(monkeypatch):
    """Regional compilation: the number of graphs torch.compile makes does not grow with depth.
    (Counted with dynamo's eager back end; the Inductor numerics are the next test.)"""
    monkeypatch.setattr(layer_program, "COMPILER_BACKEND", "eager")
    graphs = {}
    for depth in (2, 4):
        cm = compiled(llama(depth), backend="inductor")
        torch._dynamo.reset()
        counters.clear()
        x = ids()
        cm(input_ids=x, labels=x).loss.backward()
        graphs[depth] = counters["stats"]["unique_graphs"]
    assert graphs[4] == graphs[2] == 1  # one program for the stack, compiled once


def test_inductor_backend_equals_the_torch_backend():
    model = llama(2, hidden=16)
    eager, inductor = compiled(model), compiled(model, backend="inductor")
    inductor.load_state_dict(eager.state_dict())
    x = ids(2, 4)
    results = []
    for cm in (eager, inductor):
        cm.train()
        out = cm(input_ids=x, labels=x)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in cm.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    assert results[1][1].keys() == results[0][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-5)

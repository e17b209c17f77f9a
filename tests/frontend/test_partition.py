"""peftc.partition in one process: the frozen-base program and the adapter program (DLoRA), issue 18 item 1."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, compile_family, randomize_adapters
from partition_ranks import Q_V, batch, compiled

import peftc
from peftc.capture.calls import normalize_call
from peftc.errors import PartitionError
from peftc.ir.partition import BASE, USER, placement
from peftc.passes.partition_graph import partition_graph
from peftc.pipeline.runner import PassContext

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(targets, r=4):
    return {"adapters": [{"method": "lora", "targets": targets, "r": r, "alpha": 2 * r}]}


@pytest.fixture(scope="module")
def llama_qv():
    _, cm = compile_family(FAMILIES["llama"], lora(["q_proj", "v_proj"]))
    randomize_adapters(cm, std=0.2)
    return cm.train()


@pytest.fixture(scope="module")
def part(llama_qv):
    return peftc.partition(llama_qv)


def ids(seed=0, shape=(2, 9)):
    return torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))


def adapter_grads(cm) -> dict:
    return {name: p.grad.clone() for name, p in cm.adapter_root.named_parameters()}


def clear_grads(cm) -> None:
    for p in cm.adapter_root.parameters():
        p.grad = None


def test_partition_returns_what_the_compiled_model_returns_and_trains_the_same(llama_qv, part):
    cm = llama_qv
    x = ids(1)
    clear_grads(cm)
    expected = cm(input_ids=x, labels=x)
    expected.loss.backward()
    expected_grads = adapter_grads(cm)
    clear_grads(cm)
    got = part(input_ids=x, labels=x)
    got.loss.backward()
    assert all(p.grad is None for p in part.base.parameters())  # the base computes activation gradients only
    assert type(got) is type(expected)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)
    for name, grad in adapter_grads(cm).items():
        assert expected_grads[name].abs().max() > 0
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5)
    clear_grads(cm)


def test_base_holds_frozen_base_weights_only_and_user_the_adapters_only(llama_qv, part):
    part(input_ids=ids())
    adapter_ids = {id(p) for p in llama_qv.adapter_root.parameters()}
    base = list(part.base.parameters())
    assert base and not any(id(p) in adapter_ids for p in base)
    assert not any(p.requires_grad for p in base)
    assert {id(p) for p in part.user.parameters()} == adapter_ids
    assert not list(part.user.buffers())


def test_every_cut_fed_by_one_node_travels_in_one_exchange():
    _, cm = compile_family(FAMILIES["llama"], lora(SEVEN, r=2))
    cut = peftc.partition(cm).first.cut
    # per layer: (q, k, v) read one normed input; o; (gate, up) one input; down -> 4 exchanges
    assert len(cut.exchanges) == 4 * 2
    assert [(len(e.to_user), len(e.to_base)) for e in cut.exchanges[:4]] == [(1, 3), (1, 1), (1, 2), (1, 1)]


def test_traffic_is_the_schedule_measured_at_the_link(llama_qv, part):
    x = ids(2, (3, 5))
    part(input_ids=x, labels=x).loss.backward()
    traffic, report = part.traffic(), part.report()
    tokens = 15
    forward, backward = report.totals["forward_bytes_per_token"], report.totals["backward_bytes_per_token"]
    lower = traffic.to_dict()["lower_bound"]
    assert lower["to_user"] == (forward["to user"] + backward["to user"]) * tokens
    assert lower["to_base"] == (forward["to base"] + backward["to base"]) * tokens
    # what crossed: the lower bound plus the fixed headers, and the call's inputs and outputs
    assert traffic.to_user > lower["to_user"] and traffic.to_base > lower["to_base"]
    clear_grads(llama_qv)


def test_report_shows_each_layer_its_tensors_shapes_and_bytes_per_token(part):
    report = part.report()
    text = str(report)
    assert "model.layers.0" in text and "model.layers.1" in text
    rows = [r for r in report.rows if r["layer"] == "model.layers.0"]
    assert [r["direction"] for r in rows] == ["to user", "to base", "to base"]
    assert rows[0]["site"] == "self_attn.q_proj,self_attn.v_proj"
    assert rows[0]["bytes_per_token"] == 64 * 4  # the normed hidden state, hidden 64, fp32
    assert rows[2]["bytes_per_token"] == 32 * 4  # v's delta: 2 kv heads x 16
    assert "active sites: 4 of 4" in text


def test_partition_graph_tags_every_node_and_changes_nothing_the_second_time(llama_qv):
    compilation = llama_qv.compilation
    args, kwargs = normalize_call(compilation.source, *llama_qv.example_call)
    built = compilation.build(args, kwargs, compilation.train_plan())
    flat = built.flat  # the partition cuts single ops: it reads the flat graph
    ctx = PassContext(spec=compilation.spec, sites=built.sites, adapter_root=compilation.adapter_root,
                      base_params={}, trainable=frozenset(), methods={})
    assert partition_graph(flat, ctx).modified
    tags = [placement(n) for n in flat.graph.nodes]
    assert None not in tags and {t.side for t in tags} == {BASE, USER}
    user_ops = {str(n.target) for n in flat.graph.nodes
                if placement(n).side == USER and n.op == "call_function"}
    assert "aten.add.Tensor" not in user_ops  # y + delta runs in the base: only the delta crosses
    assert not partition_graph(flat, ctx).modified


def test_a_tiny_model_that_is_not_a_transformers_model_partitions_too():
    cm = compiled(Q_V, seed=3)
    part = peftc.partition(cm)
    x, y = batch(5)
    (loss, logits), (ref_loss, ref_logits) = part(x, y), cm(x, y)
    assert torch.equal(loss, ref_loss) and torch.equal(logits, ref_logits)


def test_an_adapter_that_reads_the_base_weight_cannot_be_split():
    _, cm = compile_family(FAMILIES["llama"], {"adapters": [{"method": "dora", "targets": ["q_proj"], "r": 2}]})
    with pytest.raises(PartitionError, match=r"reads the base weight .*q_proj\.weight.*user program holds adapter"):
        peftc.partition(cm)


def test_a_spec_that_trains_base_parameters_cannot_be_split():
    _, cm = compile_family(FAMILIES["llama"], {**lora(["q_proj"]), "trainable": ["*.norm.weight"]})
    with pytest.raises(PartitionError, match="trains base parameters.*drop `trainable`"):
        peftc.partition(cm)


def test_generate_through_the_partition_keeps_the_cache_on_the_base_and_measures_each_token(llama_qv, part):
    llama_qv.eval(), part.eval()
    before = len(list(part.base.buffers()))
    try:
        prompt = ids(4, (1, 5))
        assert torch.equal(part.generate(prompt, max_new_tokens=4), llama_qv.generate(prompt, max_new_tokens=4))
        prefill, *steps = part.generation_traffic()
        assert prefill.tokens == 5 and len(steps) == 3 and all(t.tokens == 1 for t in steps)
        # one token per decode step: each layer's normed input over, q's and v's deltas back (hidden 64, kv 32)
        assert steps[0].to_dict()["lower_bound"] == {"to_user": 2 * 64 * 4, "to_base": 2 * (64 + 32) * 4}
        assert len(list(part.base.buffers())) > before and not list(part.user.buffers())  # the cache: base side
    finally:
        llama_qv.train(), part.train()

"""fuse_lora_shrinks: outputs and gradients equal the unfused compile; op counts, no-op, dropout, merge, saving."""

from __future__ import annotations

import contextlib

import pytest
import torch
from families import FAMILIES, compile_family, logits, randomize_adapters
from plan_steps import without_steps
from peftc.passes.fuse_lora_shrinks import PASS

import peftc
from peftc.compiler.plan import Plan
from peftc.ir import adapters, packed_shrink
from peftc.ir.graph_edit import provenance
from peftc.ir.modes import DROPOUT_OPS

aten = torch.ops.aten
ATOL = 1e-6
LLAMA_ALL = list(FAMILIES["llama"].all_linear)  # q, k, v, o, gate, up, down
LAYERS = 2  # families.py's llama and bert


@contextlib.contextmanager
def without_fusion():
    """peftc.compile with the plan minus this pass: the reference every test compares with."""
    real = Plan.train
    Plan.train = classmethod(lambda cls, backend="torch", checkpoint_layers=False: cls(
        "train", backend=backend, checkpoint_layers=checkpoint_layers))
    try:
        yield
    finally:
        Plan.train = real


def call_inputs(family) -> dict:
    inputs = family.inputs(2, 7)
    inputs["labels"] = torch.tensor([0, 2]) if family.name == "bert" else inputs["input_ids"]
    return inputs


def compile_pair(family_name: str, spec: dict):
    """(fused, unfused) compiles of one model for one call signature, with the same non-zero adapters."""
    family = FAMILIES[family_name]
    kwargs = {"example_kwargs": call_inputs(family)}
    _, fused = compile_family(family, spec, **kwargs)
    with without_fusion():
        _, plain = compile_family(family, spec, **kwargs)
    randomize_adapters(fused)
    with torch.no_grad():
        theirs = plain.adapter_state_dict()
        for name, tensor in fused.adapter_state_dict().items():
            theirs[name].copy_(tensor)
    return fused, plain


def lora_spec(targets, **extra) -> dict:
    return {"adapters": [{"method": "lora", "targets": list(targets), "r": 4, "alpha": 8, **extra}]}


def shrinks(gm) -> list:
    """Linears whose weight is an adapter A, and packed shrinks of A's (the LoRA shrink matmuls)."""
    def is_a(node):
        return node.op == "get_attr" and str(node.target).startswith(adapters.ROOT + ".") \
            and str(node.target).endswith(".A")
    return [n for n in gm.graph.nodes if (n.target == aten.linear.default and is_a(n.args[1]))
            or (n.target == packed_shrink.OP and all(map(is_a, n.args[1])))]


def per_layer(nodes) -> list[int]:
    count = [0] * LAYERS
    for node in nodes:
        site = provenance(node)["site"]
        count[int(site.split(".layers.")[1].split(".")[0])] += 1
    return count


def step(cm, family, seed: int = 0):
    """Loss and adapter gradients of one training forward/backward."""
    cm.train()
    for p in cm.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = cm(**call_inputs(family)).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in cm.named_parameters() if p.requires_grad}


def eval_logits(cm, family):
    cm.eval()
    with torch.no_grad():
        return logits(cm(**call_inputs(family)))


def assert_same_training(fused, plain, family):
    torch.testing.assert_close(eval_logits(fused, family), eval_logits(plain, family), rtol=0, atol=ATOL)
    loss, grads = step(fused, family)
    ref_loss, ref_grads = step(plain, family)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=ATOL)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert grads[name].abs().max() > 0, name  # every adapter parameter gets a gradient
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=ATOL, msg=name)


@pytest.fixture(scope="module")
def llama_pair():
    # k_proj at r 2: the split is by each site's own rank
    return compile_pair("llama", lora_spec(LLAMA_ALL, rank_pattern={"k_proj": 2}))


# -- LLaMA, all seven projections -------------------------------------------------------------
def test_llama_shrinks_drop_from_seven_to_four_per_layer(llama_pair):
    fused, plain = llama_pair
    assert per_layer(shrinks(plain.flat_graph_module)) == [7] * LAYERS
    # q,k,v | o | gate,up | down: four shrinks (the issue counted three groups; o and down read their own inputs)
    assert per_layer(shrinks(fused.flat_graph_module)) == [4] * LAYERS
    packed = [n for n in fused.flat_graph_module.graph.nodes if n.target == packed_shrink.OP
              and (provenance(n) or {}).get("pass") == PASS]
    assert [len(n.args[1]) for n in packed] == [3, 2] * LAYERS
    split = next(n for n in fused.flat_graph_module.graph.nodes if n.target == aten.split_with_sizes.default
                 and provenance(n)["pass"] == PASS)
    assert split.args[1] == [4, 2, 4]


def test_llama_outputs_and_gradients_equal_unfused(llama_pair):
    assert_same_training(*llama_pair, FAMILIES["llama"])


def test_llama_report_names_the_groups(llama_pair):
    fused, _ = llama_pair
    text = str(fused.report())
    assert "fused LoRA shrinks into one matmul (r 4+2+4): model.layers.{0..1}.self_attn.{q_proj, k_proj, v_proj}" \
        in text
    assert "(r 4+4): model.layers.{0..1}.mlp.{gate_proj, up_proj}" in text
    record = next(r for r in fused.records if r.name == PASS)
    assert record.modified and len(record.sites) == 10 and not record.params_added


def test_adapter_names_and_checkpoints_unchanged(llama_pair, tmp_path):
    """A fused compile saves what an unfused one loads, under the same names."""
    fused, plain = llama_pair
    family = FAMILIES["llama"]
    assert fused.adapter_state_dict().keys() == plain.adapter_state_dict().keys()
    fused.save_adapter(tmp_path / "fused")
    randomize_adapters(plain, seed=7)
    plain.load_adapter(tmp_path / "fused")
    for name, tensor in plain.adapter_state_dict().items():
        torch.testing.assert_close(tensor, fused.adapter_state_dict()[name], rtol=0, atol=0)
    torch.testing.assert_close(eval_logits(plain, family), eval_logits(fused, family), rtol=0, atol=ATOL)


def test_merged_is_unchanged(llama_pair):
    fused, plain = llama_pair
    family = FAMILIES["llama"]
    merged = fused.merged()
    assert not any(provenance(n) for n in merged.flat_graph_module.graph.nodes)  # no fused leftovers
    with torch.no_grad():
        got = logits(merged(**call_inputs(family)))
    torch.testing.assert_close(got, eval_logits(fused, family), rtol=0, atol=1e-5)
    torch.testing.assert_close(got, eval_logits(plain, family), rtol=0, atol=1e-5)


def test_export_plan_builds_one_shrink_per_site(llama_pair):
    """Export builds its own graph without the fusion (its LoRA inputs then take any rank): nothing to undo."""
    fused, plain = llama_pair
    gm = fused.compilation.build(*fused.example_call, fused.compilation.export_plan(merge=False)).graph_module
    assert len(shrinks(gm)) == len(shrinks(plain.flat_graph_module)) == LAYERS * 7
    # node for node the train plan's graph without its torch-back-end passes (fusion, mask, loss)
    with without_steps(PASS, "skip_causal_masks", "lower_cross_entropy"):
        bare = fused.compilation.build(*fused.example_call, fused.compilation.train_plan()).flat
    assert len(gm.graph.nodes) == len(bare.graph.nodes)
    assert not any((provenance(n) or {}).get("pass") == PASS for n in gm.graph.nodes)
    assert len(shrinks(fused.flat_graph_module)) == LAYERS * 4  # the compiled model's own graph stays fused


# -- BERT (query/key/value), GPT-2 (nothing to fuse) ------------------------------------------
def test_bert_query_key_value_fused_and_equal():
    fused, plain = compile_pair("bert", lora_spec(["query", "key", "value", "dense"]))
    assert len(shrinks(plain.flat_graph_module)) == LAYERS * 6 + 1  # query, key, value, 3 denses per layer; the pooler
    assert len(shrinks(fused.flat_graph_module)) == LAYERS * 4 + 1  # one for query/key/value
    assert_same_training(fused, plain, FAMILIES["bert"])  # BERT's own dropout: one seed, the same masks


def test_gpt2_single_site_is_a_no_op():
    """c_attn is GPT-2's one attention input projection: no two branches share an input."""
    family = FAMILIES["gpt2"]
    _, cm = compile_family(family, lora_spec(["c_attn"]), example_kwargs=call_inputs(family))
    record = next(r for r in cm.records if r.name == PASS)
    assert not record.modified and record.nodes_after == record.nodes_before and not record.notes
    assert len(shrinks(cm.flat_graph_module)) == 2 and not any(
        (provenance(n) or {}).get("pass") == PASS for n in cm.flat_graph_module.graph.nodes)


# -- dropout: separate masks are never fused ----------------------------------------------------
def test_branches_with_dropout_stay_unfused():
    """query/key (no dropout) fuse; value's LoRA draws its own dropout mask, so it keeps its own shrink."""
    spec = {"adapters": [
        {"method": "lora", "targets": ["query", "key"], "r": 4, "alpha": 8},
        {"method": "lora", "targets": ["value"], "r": 3, "dropout": 0.2},
    ]}
    fused, plain = compile_pair("bert", spec)
    assert len(shrinks(plain.flat_graph_module)) == LAYERS * 3 and len(shrinks(fused.flat_graph_module)) == LAYERS * 2
    # (layer 0's query/key/value all read BERT's own embedding dropout: one node, one mask, fused)
    own_dropout = [n for n in shrinks(fused.flat_graph_module)
                   if n.args[0].target in DROPOUT_OPS and (provenance(n.args[0]) or {}).get("pass") == "insert_lora"]
    assert [provenance(n)["site"].split(".")[-1] for n in own_dropout] == ["value", "value"]
    record = next(r for r in fused.records if r.name == PASS)
    assert record.notes[-1] == ("not fused (each applies its own LoRA dropout mask): "
                                "bert.encoder.layer.{0..1}.attention.self.value")
    assert_same_training(fused, plain, FAMILIES["bert"])  # one seed: the same masks on both sides


def test_dropout_on_every_entry_plans_no_fusion():
    spec = peftc.Spec.from_dict(lora_spec(LLAMA_ALL, dropout=0.1))
    assert PASS not in [s.name for s in Plan.train().steps(spec)]


# -- where it runs ------------------------------------------------------------------------------
def test_not_planned_when_merging_or_lowering_to_triton():
    spec = peftc.Spec.from_dict(lora_spec(LLAMA_ALL))
    assert PASS in [s.name for s in Plan.train().steps(spec)]
    assert PASS not in [s.name for s in Plan.merged().steps(spec)]
    assert PASS not in [s.name for s in Plan.train("triton").steps(spec)]
    assert PASS not in [s.name for s in Plan.export(merge=False).steps(spec)]
    names = [s.name for s in Plan.train().steps(spec)]
    assert names.index(PASS) == names.index("freeze_params") - 1  # after every method pass


# -- peftc::packed_shrink ------------------------------------------------------------------------
def test_packed_shrink_equals_cat_and_linear_and_saves_no_packed_copy():
    from peftc.inspect.memory import saved_for_backward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weights = [torch.randn(r, 16, generator=g, requires_grad=True) for r in (4, 2, 4)]
    out = packed_shrink.packed_shrink(x, weights)
    ref = torch.nn.functional.linear(x, torch.cat(weights, 0))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    upstream = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, [x, *weights], upstream)
    ref_grads = torch.autograd.grad(ref, [x, *weights], upstream)
    for got, expected in zip(grads, ref_grads):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    x_in = torch.randn(2, 5, 16, requires_grad=True)

    def forward(fn):
        return lambda: fn(x_in * 1).sum()  # x_in * 1: an activation the forward allocates
    ours = saved_for_backward(forward(lambda h: packed_shrink.packed_shrink(h, weights)))
    theirs = saved_for_backward(forward(lambda h: torch.nn.functional.linear(h, torch.cat(weights, 0))))
    assert "cat" in theirs.by_op and "cat" not in ours.by_op and ours.total < theirs.total


def test_packed_shrink_passes_torch_library_opcheck():
    x = torch.randn(3, 8, requires_grad=True)
    weights = [torch.randn(2, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)]
    torch.library.opcheck(packed_shrink.packed_shrink, (x, weights))


def test_generation_graphs_inline_the_packed_shrinks_and_decode_the_same_tokens():
    """generate()'s graphs run under no_grad: the op's backward is moot there, so they compute its
    linear(x, cat(A_i)) inline (peftc.ir.packed_shrink.inline_packed_shrinks), to the same tokens."""
    fused, plain = compile_pair("llama", lora_spec(LLAMA_ALL))
    assert any(n.target == packed_shrink.OP for n in fused.flat_graph_module.graph.nodes)
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    tokens = fused.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens, plain.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False))
    (graphs,) = fused._generator.graphs.values()
    for gm in (graphs.prefill, graphs.decode):
        targets = [n.target for n in gm.graph.nodes]
        assert packed_shrink.OP not in targets and aten.cat.default in targets
    plain_graphs = next(iter(plain._generator.graphs.values()))
    assert sum(t == aten.linear.default for t in (n.target for n in graphs.decode.graph.nodes)) < \
        sum(t == aten.linear.default for t in (n.target for n in plain_graphs.decode.graph.nodes))  # still fused

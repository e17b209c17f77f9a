"""Eager attention (`attn_implementation="eager"`: matmul, + float mask, softmax, matmul) derives its cached graph.

peftc.capture.attention_sites recognizes transformers' eager attention in the superset graph and
peftc.capture.cached_call puts the runtime's mask where the float mask eager_mask made was: the first
cached call exports nothing, a plain call returns the original's cache, and the prompt and greedy steps,
left-padded or not, equal HF PEFT (non-zero adapters). An eager attention the surgery does not recognize,
and a mask the gate finds wrong, capture as before and still equal PEFT.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, randomize_adapters
from peft import PeftModel
from test_forward_cache import assert_same_cache, three_layer_llama
from test_forward_cache_derived import count_exports
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import eager_mask, sdpa_mask

import peftc
from peftc.capture.cached_call import CACHE_DERIVED, derive_cached_graph
from peftc.ir.causal_attention import additive_mask
from peftc.runtime import cache_derivation
from peftc.runtime.forward_cache import CachedForward

STEPS = 3
CASES = [("gpt2", "lora"), ("llama", "lora"), ("qwen2", "ia3")]  # LLaMA: three layers, the third a copy
BUILDS = {"gpt2": FAMILIES["gpt2"].build, "llama": three_layer_llama, "qwen2": FAMILIES["qwen2"].build}
COMPILED: dict = {}


def eager(build):
    def built():
        model = build()
        model.config._attn_implementation = "eager"
        return model
    return built


def reordered_gpt2():
    """GPT-2's other eager attention: reordered and upcast, its scores made by baddbmm (not recognized)."""
    torch.manual_seed(0)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                        eos_token_id=0, reorder_and_upcast_attn=True)
    return GPT2LMHeadModel(config).eval()


def compiled_pair(name: str, method: str, build, folder):
    """The compiled eager model (non-zero adapters) and HF PEFT's model over the same eager base."""
    if (name, method) not in COMPILED:
        family = FAMILIES["gpt2" if name.startswith("gpt2") else name]
        entry = {"method": method, "targets": list(family.targets)}
        if method == "lora":
            entry.update(r=4, alpha=8)
        cm = peftc.compile(eager(build)(), {"adapters": [entry]})
        randomize_adapters(cm)
        cm.save_adapter(folder, format="peft")
        COMPILED[name, method] = cm.eval(), PeftModel.from_pretrained(eager(build)(), folder).eval()
    return COMPILED[name, method]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def pair(request, tmp_path_factory):
    name, method = request.param
    return compiled_pair(name, method, BUILDS[name], tmp_path_factory.mktemp("-".join(request.param)))


@pytest.fixture
def fresh_pair(pair, monkeypatch):
    """The compiled model as if it had run no cached call yet."""
    cm, reference = pair
    monkeypatch.setattr(cm, "_cached_forward", None)
    return cm, reference


def prompt(padded: bool):
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def assert_greedy_steps_equal(cm, reference, ids, mask, **flags):
    """The prompt, then STEPS greedy tokens each continuing the last call's cache: logits and caches equal."""
    ours = cm(ids, attention_mask=mask, **flags)
    theirs = reference(input_ids=ids, attention_mask=mask, **flags)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-5, rtol=0)
    for _ in range(STEPS):
        token = theirs.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        ours = cm(token, attention_mask=mask, past_key_values=ours.past_key_values, **flags)
        theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values, **flags)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert ours.past_key_values.get_seq_length() == ids.shape[1] + STEPS
    assert_same_cache(ours.past_key_values, theirs.past_key_values)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@torch.no_grad()
def test_the_first_cached_call_exports_nothing_and_greedy_steps_equal_peft(fresh_pair, monkeypatch, padded):
    cm, reference = fresh_pair
    exports = count_exports(monkeypatch)
    assert_greedy_steps_equal(cm, reference, *prompt(padded), use_cache=True)
    assert exports == []
    graphs = list(cm._cached_forward.graphs.values())
    assert len(graphs) == 1 and graphs[0].meta[CACHE_DERIVED]


@torch.no_grad()
def test_a_plain_call_returns_the_originals_cache_and_a_loop_continues_it(fresh_pair, monkeypatch):
    """`out = cm(ids)`, then `cm(next, past_key_values=out.past_key_values)`: no use_cache, no export."""
    cm, reference = fresh_pair
    assert cm.config.use_cache
    exports = count_exports(monkeypatch)
    ids, mask = prompt(True)
    ours, theirs = cm(ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    assert list(ours.keys()) == list(theirs.keys()) and "cache" in ours.keys()
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    assert_greedy_steps_equal(cm, reference, ids, mask)
    assert exports == []


@torch.no_grad()
def test_output_attentions_with_a_cache_are_the_originals(fresh_pair, monkeypatch):
    """Eager attention returns its weights: [batch, heads, new, past + new] once a cache is continued."""
    cm, reference = fresh_pair
    exports = count_exports(monkeypatch)
    ids, mask = prompt(True)
    flags = {"use_cache": True, "output_attentions": True}
    ours, theirs = cm(ids, attention_mask=mask, **flags), reference(input_ids=ids, attention_mask=mask, **flags)
    token = theirs.logits[:, -1:].argmax(-1)
    mask = torch.cat([mask, torch.ones_like(token)], 1)
    ours = cm(token, attention_mask=mask, past_key_values=ours.past_key_values, **flags)
    theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values, **flags)
    assert len(ours.attentions) == len(theirs.attentions) == cm.config.num_hidden_layers
    for mine, original in zip(ours.attentions, theirs.attentions):
        assert mine.shape == original.shape == (2, cm.config.num_attention_heads, 1, ids.shape[1] + 1)
        torch.testing.assert_close(mine, original, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert exports == []


@torch.no_grad()
def test_the_derived_graph_reads_the_runtimes_mask_and_not_the_padding_mask(fresh_pair):
    """One additive_mask read of the mask input in place of eager_mask's where (and the boolean mask it
    came from); the padding mask, whose sizes were the new tokens', is read no more."""
    cm, _ = fresh_pair
    superset = cm._superset_flat.graph
    assert len(superset.find_nodes(op="call_function", target=torch.ops.aten.where.ScalarOther)) == 1
    ids, mask = prompt(True)
    cm(ids, attention_mask=mask, use_cache=True)
    (gm,) = cm._cached_forward.graphs.values()
    graph = gm.graph
    assert len(graph.find_nodes(op="call_function", target=additive_mask)) == 1
    assert graph.find_nodes(op="call_function", target=torch.ops.aten.where.ScalarOther) == []
    (padding,) = graph.find_nodes(op="placeholder", target="attention_mask")
    assert not padding.users


@torch.no_grad()
def test_an_eager_attention_the_surgery_does_not_recognize_captures_and_equals_peft(tmp_path, monkeypatch):
    """GPT-2's reordered attention (baddbmm, reshapes by the key length): not derived, one export, PEFT's numbers."""
    cm, reference = compiled_pair("gpt2-reordered", "lora", reordered_gpt2, tmp_path)
    exports = count_exports(monkeypatch)
    assert cm(prompt(False)[0]).past_key_values is None  # a plain call keeps its graph: no cache (documented)
    assert_greedy_steps_equal(cm, reference, *prompt(True), use_cache=True)
    assert len(exports) == 1
    assert not any(gm.meta.get(CACHE_DERIVED) for gm in cm._cached_forward.graphs.values())


@torch.no_grad()
def test_a_mask_the_gate_finds_wrong_captures_and_equals_peft(tmp_path_factory, monkeypatch):
    """The runtime's mask standing in for a wrong one (padding ignored): the gate's left-padded row differs
    from the whole sequence's, nothing derived runs, and the captured graph equals PEFT."""
    cm, reference = compiled_pair("gpt2", "lora", BUILDS["gpt2"], tmp_path_factory.mktemp("gpt2-lora"))
    made = cache_derivation.derived_inputs

    def padding_ignored(model, inputs, cache, past):
        mask = inputs.get("attention_mask")
        return made(model, {**inputs, "attention_mask": torch.ones_like(mask)}, cache, past)

    monkeypatch.setattr(cache_derivation, "derived_inputs", padding_ignored)
    exports = count_exports(monkeypatch)
    forward = CachedForward(cm.compilation, cm.plan, (cm._superset, cm._superset_flat))  # a fresh gate
    ids, mask = prompt(True)
    ours = forward({"input_ids": ids, "attention_mask": mask, "use_cache": True}, training=False)
    theirs = reference(input_ids=ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(ours.logits[mask.bool()], theirs.logits[mask.bool()], atol=1e-5, rtol=0)
    assert forward.derivation.holds() is False and len(exports) == 1
    surgery = derive_cached_graph(cm._superset_flat, forward.derivation.superset, {"input_ids": ids, "attention_mask": mask},
                                  cm.compilation.source, forward.derivation.kinds)
    assert surgery is not None  # the surgery itself succeeds: the gate refused
    assert not any(gm.meta.get(CACHE_DERIVED) for gm in forward.graphs.values())


def test_additive_mask_makes_eager_masks_float_mask_from_the_boolean_one():
    """A derived eager graph takes either mask: eager_mask's (a model configured eager) or the boolean one."""
    padding = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]).bool()  # as create_causal_mask hands it on
    sizes = {"batch_size": 2, "q_length": 2, "kv_length": 4, "q_offset": 2, "attention_mask": padding}
    boolean = sdpa_mask(**sizes, allow_is_causal_skip=False)
    made = eager_mask(**sizes, dtype=torch.float32)
    assert boolean.dtype == torch.bool and made.dtype == torch.float32 and not bool(boolean.all())
    assert torch.equal(additive_mask(boolean, torch.float32), made)
    assert additive_mask(made, torch.float32) is made

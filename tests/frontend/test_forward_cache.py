"""A forward with a KV cache (use_cache=True, past_key_values=): what the original and HF PEFT return.

Each case compiles once and runs PEFT beside it, built from the compiled model's adapter file
(non-zero weights), so logits and every layer's keys and values can be compared step by step.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, randomize_adapters
from peft import PeftModel
from peft_reference import peft_lora_grads
from transformers import DynamicCache, StaticCache

import peftc
from peftc.capture.export import COPIED_LAYERS

CASES = [("llama", "lora"), ("qwen2", "ia3"), ("gpt2", "lora")]  # every family, LoRA and one other method


def three_layer_llama():
    """tests/families.py's LLaMA with a third layer: the cache graph's capture copies layer 1 as layer 2
    (peftc.capture.layer_stacks), each copy reading and returning its own cache tensors."""
    from transformers import LlamaForCausalLM

    config = FAMILIES["llama"].build().config
    config.num_hidden_layers = 3
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


BUILDS = {"llama": three_layer_llama, "qwen2": FAMILIES["qwen2"].build, "gpt2": FAMILIES["gpt2"].build}
STEPS = 3


COMPILED: dict = {}  # one compile per case for the whole module (the llama_pair tests reuse llama-lora's)


def compiled_pair(case: tuple[str, str], folder):
    if case not in COMPILED:
        family_name, method = case
        family = FAMILIES[family_name]
        entry = {"method": method, "targets": list(family.targets)}
        if method == "lora":
            entry.update(r=4, alpha=8)
        cm = peftc.compile(BUILDS[family_name](), {"adapters": [entry]})
        randomize_adapters(cm)
        cm.save_adapter(folder, format="peft")
        COMPILED[case] = cm.eval(), PeftModel.from_pretrained(BUILDS[family_name](), folder).eval()
    return COMPILED[case]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(case))
def pair(request, tmp_path_factory):
    return compiled_pair(request.param, tmp_path_factory.mktemp("-".join(request.param)))


def prompt(padded: bool):
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:  # left padding, as decoder-only batches are padded
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def assert_same_cache(ours, theirs):
    assert isinstance(ours, DynamicCache)
    assert len(ours.layers) == len(theirs.layers)
    for mine, reference in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(mine.keys, reference.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.values, reference.values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padded", [False, True])
@torch.no_grad()
def test_prefill_and_continued_steps_equal_peft(pair, padded):
    cm, reference = pair
    ids, mask = prompt(padded)
    ours = cm(ids, attention_mask=mask, use_cache=True)
    theirs = reference(input_ids=ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    for _ in range(STEPS):  # a manual greedy loop, each call continuing the cache the last one returned
        token = theirs.logits[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(ours.logits[:, -1].argmax(-1, keepdim=True), token)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        ours = cm(token, attention_mask=mask, past_key_values=ours.past_key_values, use_cache=True)
        theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values,
                           use_cache=True)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert ours.past_key_values.get_seq_length() == ids.shape[1] + STEPS
    assert_same_cache(ours.past_key_values, theirs.past_key_values)


@torch.no_grad()
def test_return_dict_false_gives_the_originals_tuple(pair):
    cm, reference = pair
    ids, mask = prompt(False)
    ours = cm(ids, attention_mask=mask, use_cache=True, return_dict=False)
    theirs = reference(input_ids=ids, attention_mask=mask, use_cache=True, return_dict=False)
    assert [type(x) for x in ours] == [type(x) for x in theirs] == [torch.Tensor, DynamicCache]
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    assert_same_cache(ours[1], theirs[1])


@torch.no_grad()
def test_one_graph_serves_the_prompt_and_every_step(pair):
    """The past length is a dynamic input: a prompt (empty past) and each step run one captured graph."""
    cm, _ = pair
    ids, mask = prompt(True)
    out = cm(ids, attention_mask=mask, use_cache=True)
    graphs = dict(cm._cached_forward.graphs)
    cm(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=out.past_key_values,
       use_cache=True)
    assert cm._cached_forward.graphs == graphs  # the step captured nothing
    if cm.config.num_hidden_layers > 2:  # captured with two layers, the third a copy
        assert all(gm.meta[COPIED_LAYERS] for gm in graphs.values())


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """The llama-lora case's compiled model, and the original model it was compiled from."""
    cm, reference = compiled_pair(CASES[0], tmp_path_factory.mktemp("llama-lora"))
    return cm, three_layer_llama(), reference


@torch.no_grad()
def test_a_passed_cache_is_updated_in_place_as_the_original_does(llama_pair):
    cm, model, _ = llama_pair
    ids, mask = prompt(False)
    for module in (cm, model):
        cache = DynamicCache(config=model.config)  # made by the caller, filled by the first call
        out = module(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache and cache.get_seq_length() == ids.shape[1]
        after = module(ids[:, :1], past_key_values=cache, use_cache=True)  # no mask: all ones
        assert after.past_key_values is cache and cache.get_seq_length() == ids.shape[1] + 1


@torch.no_grad()
def test_a_cache_the_model_could_not_have_produced_fails_naming_the_problem(llama_pair):
    cm, model, _ = llama_pair
    ids, mask = prompt(False)
    good = cm(ids, attention_mask=mask, use_cache=True).past_key_values
    layer = good.layers[0]
    step = {"attention_mask": torch.cat([mask, mask[:, :1]], 1), "use_cache": True}
    with pytest.raises(ValueError, match="cache: holds 1 layers, LlamaForCausalLM has 3"):
        cm(ids[:, :1], past_key_values=DynamicCache([(layer.keys, layer.values)]), **step)
    narrow = DynamicCache([(layer.keys[..., :8], layer.values[..., :8])] * 3)
    with pytest.raises(ValueError, match=r"layer 0 keys have shape \(2, 2, 6, 8\).*head dim=16"):
        cm(ids[:, :1], past_key_values=narrow, **step)
    with pytest.raises(ValueError, match="batch=1"):
        cm(ids[:1, :1], past_key_values=good, **{**step, "attention_mask": step["attention_mask"][:1]})
    with pytest.raises(TypeError, match="expected the transformers DynamicCache.*got StaticCache"):
        cm(ids[:, :1], past_key_values=StaticCache(config=model.config, max_cache_len=16), **step)


@torch.no_grad()
def test_a_plain_call_returns_the_cache_peft_returns_and_a_loop_continues_it(pair):
    """`out = cm(ids); cm(next, past_key_values=out.past_key_values)`, no use_cache anywhere: what a user's own
    decoding loop does. The original returns a cache whenever config.use_cache is on (LLaMA, Qwen2, GPT-2's
    default); so does the compiled model, through the cached graph derived from the superset (no export)."""
    cm, reference = pair
    assert cm.config.use_cache
    ids, mask = prompt(True)
    ours, theirs = cm(ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    assert list(ours.keys()) == list(theirs.keys()) == ["logits", "cache"]
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    for _ in range(2):
        token = theirs.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        ours = cm(token, attention_mask=mask, past_key_values=ours.past_key_values)
        theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert ours.past_key_values.get_seq_length() == ids.shape[1] + 2
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    as_tuple, original = cm(ids, return_dict=False), reference(input_ids=ids, return_dict=False)
    assert [type(x) for x in as_tuple] == [type(x) for x in original] == [torch.Tensor, DynamicCache]


@torch.no_grad()
def test_use_cache_comes_from_the_argument_then_the_config_as_in_the_original(llama_pair, monkeypatch):
    cm, model, _ = llama_pair
    ids, mask = prompt(False)

    def fields(module, **kwargs):
        return list(module(ids, attention_mask=mask, **kwargs).keys())

    for module in (cm, model):
        assert fields(module) == fields(module, use_cache=True) == ["logits", "cache"]
        assert fields(module, use_cache=False) == ["logits"]
    monkeypatch.setattr(model.config, "use_cache", False)  # cm's source is `model`'s twin: set both
    monkeypatch.setattr(cm.config, "use_cache", False)
    for module in (cm, model):
        assert fields(module) == fields(module, use_cache=False) == ["logits"]
        assert fields(module, use_cache=True) == ["logits", "cache"]


def test_training_calls_return_the_cache_unless_checkpointing_drops_it_as_in_the_original(llama_pair):
    """In training the original returns a cache too; under gradient checkpointing (with gradients on) it drops
    use_cache, even use_cache=True. peftc: the cached graph (no slower, no more memory: RESULTS.md), and under
    checkpointing the layer-structured checkpointed graph with no cache. The loss trains either way."""
    cm, model, _ = llama_pair
    ids, mask = prompt(True)
    labels = ids.masked_fill(mask == 0, -100)
    try:
        for module in (cm, model):
            module.train()
            out = module(ids, attention_mask=mask, labels=labels)
            assert list(out.keys()) == ["loss", "logits", "cache"]
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for flags in ({}, {"use_cache": True}):
                out = module(ids, attention_mask=mask, labels=labels, **flags)
                assert list(out.keys()) == ["loss", "logits"], (type(module).__name__, flags)
            with torch.no_grad():  # no backward to replay: the cache stays
                assert "cache" in module(ids, attention_mask=mask).keys()
        cm.zero_grad()
        cm(ids, attention_mask=mask, labels=labels).loss.backward()  # the checkpointed graph trains
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cm.adapter_root.parameters())
    finally:
        for module in (cm, model):
            module.gradient_checkpointing_disable()
            module.eval()


@torch.no_grad()
def test_a_merged_model_returns_the_cache_peft_returns(llama_pair):
    """merged(): the adapters folded, its plain call's cache derived from its own superset graph, as PEFT's."""
    cm, _, reference = llama_pair
    merged = cm.merged().eval()
    ids, mask = prompt(True)
    ours, theirs = merged(ids, attention_mask=mask), reference(input_ids=ids, attention_mask=mask)
    assert list(ours.keys()) == list(theirs.keys())
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    token = theirs.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([mask, torch.ones_like(token)], 1)
    ours = merged(token, attention_mask=mask, past_key_values=ours.past_key_values)
    theirs = reference(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)


@torch.no_grad()
def test_position_ids_with_a_cache_equal_peft(llama_pair):
    """A left-padded batch decoded with positions counted from the mask, as users compute them."""
    cm, _, reference = llama_pair
    ids, mask = prompt(True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = cm(ids, attention_mask=mask, position_ids=positions, use_cache=True)
    theirs = reference(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    token = theirs.logits[:, -1].argmax(-1, keepdim=True)
    step = {"attention_mask": torch.cat([mask, torch.ones_like(token)], 1), "position_ids": positions[:, -1:] + 1,
            "use_cache": True}
    ours = cm(token, past_key_values=ours.past_key_values, **step)
    theirs = reference(input_ids=token, past_key_values=theirs.past_key_values, **step)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)


LORA_CASES = [case for case in CASES if case[1] == "lora"]  # LLaMA and GPT-2: the ones PEFT's LoRA grads read


@pytest.fixture(scope="module", params=LORA_CASES, ids=lambda case: "-".join(case))
def lora_pair(request, tmp_path_factory):
    return compiled_pair(request.param, tmp_path_factory.mktemp("-".join(request.param)))


def test_labels_with_a_cache_give_the_loss_the_cache_and_the_gradients_peft_gives(lora_pair):
    """`model(ids, labels=ids, use_cache=True)`: loss, logits and past_key_values, and the loss trains as PEFT's."""
    cm, reference = lora_pair
    ids, mask = prompt(True)
    labels = ids.masked_fill(mask == 0, -100)
    for name, param in reference.named_parameters():  # loaded for inference: frozen
        param.requires_grad_("lora_" in name)
    cm.zero_grad()
    reference.zero_grad()
    ours = cm(ids, attention_mask=mask, labels=labels, use_cache=True)
    theirs = reference(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True)
    assert list(ours.keys()) == list(theirs.keys())[:3] and list(ours.keys())[:2] == ["loss", "logits"]
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    ours.loss.backward()
    theirs.loss.backward()
    mine = {name: p.grad for name, p in cm.adapter_root.named_parameters()}
    expected = peft_lora_grads(reference)
    assert mine.keys() == expected.keys() and len(mine) >= 4
    for name, grad in mine.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=0)


@torch.no_grad()
def test_inputs_embeds_start_a_cache_that_embeds_and_ids_continue_as_peft(lora_pair):
    """A prompt given as embeddings (one graph for it and each embeds step), then a step with token ids."""
    cm, reference = lora_pair
    ids, mask = prompt(True)
    embed = reference.get_input_embeddings()
    ours = cm(inputs_embeds=embed(ids), attention_mask=mask, use_cache=True)
    theirs = reference(inputs_embeds=embed(ids), attention_mask=mask, use_cache=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    for as_embeds in (True, False):
        token = theirs.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        step = {"inputs_embeds": embed(token)} if as_embeds else {"input_ids": token}
        ours = cm(**step, attention_mask=mask, past_key_values=ours.past_key_values, use_cache=True)
        theirs = reference(**step, attention_mask=mask, past_key_values=theirs.past_key_values, use_cache=True)
        torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert ours.past_key_values.get_seq_length() == ids.shape[1] + 2
    assert_same_cache(ours.past_key_values, theirs.past_key_values)


@torch.no_grad()
def test_a_cached_call_it_cannot_run_fails_naming_what_it_passes(llama_pair):
    """Checked before any capture: the refusals name the argument and what it should be."""
    cm, model, _ = llama_pair
    ids, _ = prompt(False)
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match=r"exactly one of input_ids.*inputs_embeds.*\['input_ids', 'inputs_embeds'\]"):
        cm(ids, inputs_embeds=embeds, use_cache=True)
    with pytest.raises(ValueError, match=r"inputs_embeds: \[\.\.\., 64\] torch.float64.*\[\.\.\., 64\] torch.float32"):
        cm(inputs_embeds=embeds.double(), use_cache=True)
    with pytest.raises(NotImplementedError, match=r"also passes \['cache_position'\]"):
        cm(ids, cache_position=torch.arange(ids.shape[1]), use_cache=True)


@torch.no_grad()
def test_logits_to_keep_with_a_cache_equals_peft(llama_pair):
    """An int logits_to_keep is taken as its positions by the graph of the cached call without it (derived,
    peftc.capture.kept_logits): the prompt's last logits and a continued step's, with the cache, as PEFT's."""
    cm, _, reference = llama_pair
    ids, mask = prompt(True)
    ours = cm(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    theirs = reference(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    assert ours.logits.shape[1] == 1
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    token = theirs.logits[:, -1].argmax(-1, keepdim=True)
    step = {"attention_mask": torch.cat([mask, torch.ones_like(token)], 1), "use_cache": True, "logits_to_keep": 1}
    ours = cm(token, past_key_values=ours.past_key_values, **step)
    theirs = reference(input_ids=token, past_key_values=theirs.past_key_values, **step)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=0)
    assert_same_cache(ours.past_key_values, theirs.past_key_values)
    keeping = [s for s in cm._cached_forward.graphs if "logits_to_keep" in dict(s.kwargs)]
    assert [dict(s.kwargs)["logits_to_keep"] for s in keeping] == ["tensor[1d,int64]"]  # not the int: derived

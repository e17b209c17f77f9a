"""generate() for the virtual-token methods (issue 13 item 3, issue 17 item 2): prompt tuning, p-tuning and
prefix tuning, compiled alone and served beside LoRA; greedy tokens equal HF PEFT's, with and without left
padding.

The PEFT reference, and why not `PeftModel.generate` with its cache: with peft 0.21.2 and transformers 5.24,
PEFT's generate() for prompt learning reads the cache under its old keyword (`past_key_values`) while the
model's is `cache`: prompt tuning re-injects the N virtual tokens at every decode step, and prefix tuning
never puts its prefix into the cache that is used (with use_cache=False its prefix cache object is extended
in place from one step to the next). So:
- prompt / p-tuning: PEFT's own generate(use_cache=False), which re-runs its forward on the whole sequence
  each step (it drops position_ids, so positions run 0..N+S-1 over the padding too);
- prefix: greedy decoding over PEFT's forward given the position_ids generate() passes (transformers'
  mask-derived positions; PEFT's forward adds N to them, as its generate does).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from families import FAMILIES, compile_family, compile_family_specs, randomize_adapters
from generation_steps import generator_of, prefill_and_step
from peft_reference import sharpened

import peftc
from peftc.runtime.generate import with_slots
from peftc.serving.virtual_inputs import with_prompt_slots

N = 4
NEW = 8
GREEDY = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
PTUNING = {"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16}


def prompts(batch: int = 2, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 128, (batch, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:  # left padding on every other row, as transformers pads decoder-only prompts
        ids[1::2, :3], mask[1::2, :3] = 0, 0
    return ids, mask


def peft_model(family, cm, entry: dict):
    """The `peft` model of `entry`'s method on the same base, holding `cm`'s virtual-token weights."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    task = TaskType.CAUSAL_LM
    if entry["method"] == "prompt":
        config = PromptTuningConfig(task_type=task, num_virtual_tokens=entry["num_tokens"])
    elif entry["method"] == "prefix":
        config = PrefixTuningConfig(task_type=task, num_virtual_tokens=entry["num_tokens"])
    else:
        config = PromptEncoderConfig(task_type=task, num_virtual_tokens=entry["num_virtual_tokens"],
                                     encoder_hidden_size=entry["encoder_hidden_size"])
    ref = get_peft_model(family.build(), config).eval()
    ours = {name.rpartition(".")[2]: t for name, t in cm.adapter_state_dict().items()}
    with torch.no_grad():
        if entry["method"] == "prefix":
            ref.prompt_encoder.default.embedding.weight.copy_(prefix_table(cm, ref.active_peft_config))
        else:
            for name, p in ref.prompt_encoder.default.named_parameters():
                p.copy_(ours["embedding" if name == "embedding.weight" else name.replace(".", "_")])
    return ref


def prefix_table(cm, config) -> torch.Tensor:
    """HF PEFT's [N, layers * 2 * kv_heads * head_dim] prefix table from peftc's per-layer key/value."""
    sd = cm.adapter_state_dict()
    keys = [k for k in sd if k.endswith("prefix.key")]
    n = config.num_virtual_tokens
    table = torch.empty(n, 2 * len(keys), config.num_attention_heads, config.token_dim // config.num_attention_heads)
    for layer, key in enumerate(keys):
        table[:, 2 * layer] = sd[key].permute(1, 0, 2)
        table[:, 2 * layer + 1] = sd[key[: -len("key")] + "value"].permute(1, 0, 2)
    return table.view(n, -1)


def peft_greedy(ref, method: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """HF PEFT's greedy tokens (see the module docstring for the two ways)."""
    if method != "prefix":
        return ref.generate(input_ids=ids, attention_mask=mask, use_cache=False, **GREEDY)
    with torch.no_grad():
        for _ in range(NEW):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what transformers' generate passes
            out = ref(input_ids=ids, attention_mask=mask, position_ids=positions)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return ids


def livelier(family):
    """Models whose tokens depend on the positions: GPT-2 at its init (std 0.02) repeats the last token
    whatever comes before it (x10 weights fix that); LLaMA's query/key x10 make attention sharp enough
    that where the virtual tokens sit relative to the prompt changes the tokens."""
    if family.name != "gpt2":
        return sharpened(family)

    def build():
        model = family.build()
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(10)
        return model

    return dataclasses.replace(family, build=build)


@functools.lru_cache(maxsize=None)
def compiled(family_name: str, method: str):
    """(family, compiled model in eval mode, its PEFT twin) for `method`, adapters non-zero."""
    family = livelier(FAMILIES[family_name])
    entry = PTUNING if method == "p_tuning" else {"method": method, "num_tokens": N}
    _, cm = compile_family(family, {"adapters": [entry]})
    randomize_adapters(cm, std=0.5 if method != "p_tuning" else 0.3)
    return family, cm.eval(), peft_model(family, cm, entry)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("family_name, method", [("llama", "prompt"), ("llama", "prefix"), ("llama", "p_tuning"),
                                                 ("gpt2", "prompt"), ("gpt2", "prefix")])
def test_greedy_tokens_equal_peft(family_name, method, padded):
    family, cm, ref = compiled(family_name, method)
    ids, mask = prompts(padded=padded)
    ours = cm.generate(ids, attention_mask=mask, **GREEDY)
    assert ours.shape == (2, 6 + NEW)  # the virtual tokens are not in the sequences, as in PEFT's
    assert ours.tolist() == peft_greedy(ref, method, ids, mask).tolist()
    base = family.build().generate(ids, attention_mask=mask, **GREEDY)
    assert ours[:, 6:].tolist() != base[:, 6:].tolist()  # the virtual tokens change what is generated


def test_prefix_forward_with_given_positions_equals_peft():
    """Given position_ids, a prefix-tuned forward moves them by N, as PEFT's does (what its generate relies on)."""
    _, cm, ref = compiled("llama", "prefix")
    ids, mask = prompts()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        got = cm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        want = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        unshifted = ref(input_ids=ids, attention_mask=mask, position_ids=positions - N).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, unshifted, atol=1e-3)


def test_sampling_with_a_seed_is_reproducible():
    _, cm, _ = compiled("llama", "prompt")
    ids, mask = prompts()
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(cm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=1.5))
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(12)
    assert not torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True,
                                       temperature=3.0), runs[0])


@pytest.mark.parametrize("method", ["prompt", "p_tuning"])
def test_max_length_counts_the_callers_tokens_only(method):
    _, cm, _ = compiled("llama", method)
    ids, mask = prompts()
    assert cm.generate(ids, attention_mask=mask, max_length=9, do_sample=False).shape == (2, 9)


def test_prompt_with_lora_and_its_merged_model_generate_the_same_tokens():
    """A hybrid (prompt + LoRA): merged() folds the LoRA and keeps the prompt, and generates the same tokens."""
    family = livelier(FAMILIES["llama"])
    spec = {"adapters": [{"method": "prompt", "num_tokens": 3}, {"method": "lora", "targets": ["q_proj"], "r": 2}]}
    _, cm = compile_family(family, spec)
    randomize_adapters(cm, std=0.5)
    cm.eval()
    ids, mask = prompts()
    got = cm.generate(ids, attention_mask=mask, **GREEDY)
    assert got.shape == (2, 6 + NEW)
    assert got.tolist() == cm.merged().generate(ids, attention_mask=mask, **GREEDY).tolist()


# -- served: prompt and prefix rows beside LoRA, each row as its own compiled model ----------------------
SERVED = {"prompt": {"method": "prompt", "num_tokens": 3},
          "prompt5": {"method": "prompt", "num_tokens": 5},
          "prefix": {"method": "prefix", "num_tokens": 2},
          "lora": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}}
ROWS = ["prefix", "prompt", "lora", "prompt5", None, "prefix", "lora", "prompt"]  # odd rows left-padded


@pytest.fixture(scope="module")
def served():
    family = livelier(FAMILIES["llama"])
    example = family.inputs(2, 4)
    _, cms = compile_family_specs(family, {name: {"adapters": [entry]} for name, entry in SERVED.items()},
                                  example_kwargs=example)
    for seed, name in enumerate(SERVED):
        randomize_adapters(cms[name], std=0.5, seed=seed)
        cms[name].eval()
    return family, cms, peftc.serve_adapters(family.build(), cms, example_kwargs=example).eval()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
def test_served_rows_generate_as_their_own_compiled_models(served, padded):
    family, cms, mm = served
    ids, mask = prompts(len(ROWS), padded)
    got = mm.generate(ids, attention_mask=mask, adapter_ids=ROWS, **GREEDY)
    assert got.shape == (len(ROWS), 6 + NEW)
    for name, cm in cms.items():
        rows = [i for i, r in enumerate(ROWS) if r == name]
        assert got[rows].tolist() == cm.generate(ids[rows], attention_mask=mask[rows], **GREEDY).tolist(), name
    base = family.build().generate(ids[4:5], attention_mask=mask[4:5], **GREEDY)
    assert got[4].tolist() == base[0].tolist()


def test_served_prefill_and_decode_logits_equal_the_own_models_to_1e5(served):
    """The served generation graphs against each own model's, logits row by row: the prefill's last position,
    then one decode step from the cache (prompt rows with their virtual tokens in it, prefix rows shifted)."""
    _, cms, mm = served
    ids, mask = prompts(len(ROWS), padded=True)
    index = mm.adapter_index(ROWS, len(ROWS))
    width = max(e["num_tokens"] for e in SERVED.values() if e["method"] == "prompt")
    lengths = torch.tensor([SERVED[r]["num_tokens"] if r and SERVED[r]["method"] == "prompt" else 0 for r in ROWS])
    slot_ids, slot_mask, position_mask = with_prompt_slots(ids, mask, lengths, width)
    got = prefill_and_step(generator_of(mm), slot_ids, slot_mask, {"adapter_ids": index},
                           position_mask)
    for name, cm in cms.items():
        rows = [i for i, r in enumerate(ROWS) if r == name]
        generator = generator_of(cm)  # the graphs its generate() in the test above runs (the same batch size)
        if generator.prompt_tokens:  # its N slots first, as its generate() puts them
            own_ids, own_mask, own_positions = with_slots(ids[rows], mask[rows], generator.prompt_tokens)
        else:
            own_ids, own_mask, own_positions = ids[rows], mask[rows], None
        for got_part, want_part in zip(got, prefill_and_step(generator, own_ids, own_mask, {}, own_positions)):
            torch.testing.assert_close(got_part[rows], want_part, atol=1e-5, rtol=1e-5, msg=name)

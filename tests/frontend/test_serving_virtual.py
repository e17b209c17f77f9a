"""Prompt- and prefix-tuning adapters in mixed served batches: each row its own virtual tokens or prefix keys and
values (or none), checked row by row against each adapter's own compiled model and against PEFT's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, compile_family, compile_family_specs, logits, randomize_adapters
from peft_reference import save_random_peft_folders

import peftc
from peftc import SpecError

TOL = dict(atol=1e-5, rtol=1e-5)
BATCH, SEQ = 7, 5
LINEAR_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
ROWS = ["prompt3", "prefix4", None, "prompt5", "prefix2", "lora", "prompt3"]
WIDTH = 5  # the most virtual tokens any served prompt adapter has: every row's output gains that many positions


def _entries(family: str) -> dict:
    return {"prompt3": {"method": "prompt", "num_tokens": 3}, "prompt5": {"method": "prompt", "num_tokens": 5},
            "prefix4": {"method": "prefix", "num_tokens": 4}, "prefix2": {"method": "prefix", "num_tokens": 2},
            "lora": {"method": "lora", "targets": LINEAR_TARGETS[family], "r": 2, "alpha": 4}}


def _padded(family, batch: int, seq: int) -> dict:
    inputs = family.inputs(batch, seq)
    inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    inputs["attention_mask"][1::3, :2] = 0  # left padding on some rows, prompt and prefix rows among them
    return inputs


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def served(request, tmp_path_factory):
    """(family, {name: own CompiledModel}, ServedModel): prompt5 and prefix2 from saved folders, the rest as models."""
    family = FAMILIES[request.param]
    inputs = family.inputs(BATCH, SEQ)
    entries = _entries(request.param)
    _, cms = compile_family_specs(family, {name: {"adapters": [entry]} for name, entry in entries.items()},
                                  example_kwargs=inputs)
    for seed, name in enumerate(entries):
        randomize_adapters(cms[name], std=0.5, seed=seed)
        cms[name].eval()
    sources = dict(cms)
    for name in ("prompt5", "prefix2"):
        sources[name] = tmp_path_factory.mktemp(request.param) / name
        cms[name].save_adapter(sources[name])
    return family, cms, peftc.serve_adapters(family.build(), sources, example_kwargs=inputs)


def _own_rows(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """The served output's last positions, as many as the adapter's own model has (its virtual tokens
    and the tokens): the slots before them are padding."""
    return got[:, got.shape[1] - want.shape[1]:]


def test_each_row_equals_its_adapters_own_model(served):
    family, cms, mm = served
    inputs = _padded(family, BATCH, SEQ)
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=ROWS))
        assert got.shape[:2] == (BATCH, WIDTH + SEQ)
        for name, cm in cms.items():
            rows = [i for i, r in enumerate(ROWS) if r == name]
            want = logits(cm(**inputs))[rows]
            torch.testing.assert_close(_own_rows(got[rows], want), want, **TOL)
        base = logits(family.build()(**inputs))
        torch.testing.assert_close(got[2, WIDTH:], base[2], **TOL)
        assert not torch.allclose(got[0, WIDTH:], base[0], **TOL)  # the prompt acts
        assert not torch.allclose(got[1, WIDTH:], base[1], **TOL)  # the prefix acts


def test_batch_without_virtual_rows_and_single_rows(served):
    """A batch of one row, and one where no row has virtual tokens: each still equals its own model."""
    family, cms, mm = served
    inputs = family.inputs(3, 4)
    with torch.no_grad():
        for rows in (["prefix2"], ["lora", None, "lora"]):
            part = {k: v[: len(rows)] for k, v in inputs.items()}
            got = logits(mm(**part, adapter_ids=rows))
            for i, name in enumerate(rows):
                want = logits((cms[name] if name else family.build())(**{k: v[i:i + 1] for k, v in part.items()}))
                torch.testing.assert_close(_own_rows(got[i:i + 1], want), want, **TOL)


def test_graph_gathers_one_prompt_and_one_prefix_per_attention_op(served):
    family, _, mm = served
    graph = mm.graph_module.graph
    sdpa = [n for n in graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    prefix_cats = [n for n in graph.nodes if n.target == torch.ops.aten.cat.default
                   and n.meta.get("peftc", {}).get("pass") == "lower_prefix_multi"]
    assert len(prefix_cats) == 3 * len(sdpa)  # keys, values, mask at every attention op
    prompt_cats = [n for n in graph.nodes if n.target == torch.ops.aten.cat.default
                   and n.meta.get("peftc", {}).get("pass") == "lower_prompt_multi"]
    lengthened = {"input_ids", "attention_mask", "position_ids"}
    assert len(prompt_cats) == len(lengthened) + 1  # each sequence input, and the embedding output
    banks = {name: m for name, m in mm.compilation.adapter_root.named_modules() if name.endswith("_multi")}
    prompt_bank = next(m for n, m in banks.items() if n.endswith("prompt_multi"))
    assert prompt_bank.embedding.shape[:2] == (len(mm.adapter_names) + 1, WIDTH)
    assert prompt_bank.lengths.tolist() == [3, 5, 0, 0, 0, 0]  # prompt3, prompt5, the others and the base: none


def test_report_names_prompt_and_prefix_sites(served):
    family, cms, mm = served
    rows = {row["name"]: row for row in mm.report().to_dict()["adapters"]}
    assert rows["prompt3"]["method"] == "prompt" and rows["prefix4"]["method"] == "prefix"
    assert rows["prompt3"]["sites"] == [cms["prompt3"].records[0].sites[0]]
    assert rows["prefix4"]["sites"] == sorted(cms["prefix4"].records[0].sites)
    assert rows["prompt3"]["params"] == cms["prompt3"].report().to_dict()["totals"]["adapter_params"]
    text = str(mm.report())
    assert "prompt (prompt3)" in text and "lower_prefix_multi touched" in text


def test_peft_prompt_and_prefix_folders_serve_beside_lora(tmp_path):
    """PEFT prompt-tuning, prefix-tuning and LoRA folders in one served model, rows equal to PEFT's own models
    (PEFT's mixed batches, adapter_names=, do not take prompt learning, so each folder is loaded alone)."""
    from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType

    family = FAMILIES["llama"]
    configs = {"prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4),
               "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
               "lora": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])}
    save_random_peft_folders(family.build, configs, tmp_path, seed=3)
    inputs = _padded(family, 5, 4)
    mm = peftc.serve_adapters(family.build(), {n: tmp_path / n for n in configs}, example_kwargs=family.inputs(2, 3))
    rows = ["prefix", "prompt", None, "lora", "prompt"]
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=rows))
        for name in configs:
            want = logits(PeftModel.from_pretrained(family.build(), tmp_path / name).eval()(**inputs))
            picked = [i for i, r in enumerate(rows) if r == name]
            torch.testing.assert_close(_own_rows(got[picked], want[picked]), want[picked], **TOL)
    assert [a.method for a in mm.plan.serving.adapters] == ["prompt", "prefix", "lora"]


def test_non_lora_folders_share_the_captures_of_their_compiles(tmp_path):
    """Four non-LoRA PEFT folders (two IA3, prompt, prefix) cost 3 exports, not 5: the folders' own compiles share
    one capture store, so the IA3 pair exports the superset call once and prompt and prefix (whose superset has
    no position_ids: they shift the positions themselves) once more, then the served graph; rows equal PEFT's."""
    from export_counter import counted_exports
    from peft import IA3Config, PeftModel, PrefixTuningConfig, PromptTuningConfig, TaskType

    family = FAMILIES["llama"]
    configs = {"ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               "ia3v": IA3Config(target_modules=["v_proj", "up_proj"], feedforward_modules=["up_proj"]),
               "prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3),
               "prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2)}
    save_random_peft_folders(family.build, configs, tmp_path, seed=4, scale=0.3, offset=0.5)
    with counted_exports() as exports:
        mm = peftc.serve_adapters(family.build(), {n: tmp_path / n for n in configs},
                                  example_kwargs=family.inputs(2, 3))
    assert len(exports) == 3
    inputs = _padded(family, 5, 4)
    rows = ["ia3v", "prompt", "ia3", "prefix", None]
    with torch.no_grad():
        got = logits(mm(**inputs, adapter_ids=rows))
        for name in configs:
            want = logits(PeftModel.from_pretrained(family.build(), tmp_path / name).eval()(**inputs))
            picked = [i for i, r in enumerate(rows) if r == name]
            torch.testing.assert_close(_own_rows(got[picked], want[picked]), want[picked], **TOL)


def test_explicit_positions_and_gated_prefixes_are_refused(tmp_path):
    family = FAMILIES["llama"]
    inputs = family.inputs(2, 3)
    _, prompt = compile_family(family, {"adapters": [{"method": "prompt", "num_tokens": 2}]}, example_kwargs=inputs)
    mm = peftc.serve_adapters(family.build(), {"p": prompt}, example_kwargs=inputs)
    with pytest.raises(NotImplementedError, match="position_ids"):
        mm(**inputs, position_ids=torch.arange(3).expand(2, 3), adapter_ids=["p", None])
    _, gated = compile_family(family, {"adapters": [{"method": "prefix", "num_tokens": 2, "gate": True}]},
                              example_kwargs=inputs)
    with pytest.raises(SpecError, match="gate"):
        peftc.serve_adapters(family.build(), {"g": gated}, example_kwargs=inputs)


def test_plans_without_virtual_tokens_leave_the_graph_alone():
    from peftc.ir.lora_bank import ServedAdapter, ServingPlan, SiteAdapter, SiteLora
    from peftc.passes.lower_prefix_multi import lower_prefix_multi
    from peftc.passes.lower_prompt_multi import lower_prompt_multi

    from test_serving_mixed import _mlp_context

    lora = ServedAdapter("a", "lora", {"fc2": SiteAdapter(lora=SiteLora(torch.ones(2, 32), torch.ones(4, 2), 1.0))})
    gm, ctx = _mlp_context(ServingPlan((lora,)))
    before = gm.code
    results = [lower_prompt_multi(gm, ctx), lower_prefix_multi(gm, ctx)]
    gm.recompile()
    assert not any(r.modified for r in results) and gm.code == before
    assert not ServingPlan((lora,)).has_virtual_tokens


def test_onnx_export_rows_equal_the_served_model(served, tmp_path):
    """Every row's ONNX Runtime output equals the served model's, the padding slots included (rows with fewer
    virtual tokens than the width, and rows with none, have slot queries that see no key: the export writes
    torch's answer there, 0, which ONNX Runtime would otherwise compute as a uniform average)."""
    ort = pytest.importorskip("onnxruntime")
    family, _, mm = served
    session = ort.InferenceSession(str(peftc.export_onnx(mm, tmp_path / "served.onnx")))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids", "adapter_ids"]
    inputs = _padded(family, BATCH, SEQ)
    ids = mm.adapter_index(ROWS, BATCH)
    with torch.no_grad():
        want = logits(mm(**inputs, adapter_ids=ROWS)).numpy()
    feed = {"input_ids": inputs["input_ids"].numpy(), "attention_mask": inputs["attention_mask"].numpy(),
            "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).numpy(),  # as served calls pass them
            "adapter_ids": ids.numpy()}
    got = session.run(None, feed)[0]
    assert got.shape == (BATCH, WIDTH + SEQ, want.shape[-1])
    for row in range(BATCH):
        np.testing.assert_allclose(got[row], want[row], atol=1e-5, rtol=1e-5, err_msg=str(ROWS[row]))

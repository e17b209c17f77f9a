"""export_onnx of a served model: the adapter ids stay an ONNX input, rows match the served model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, compile_family_specs, logits, randomize_adapters

import peftc

ort = pytest.importorskip("onnxruntime")

SPECS = {
    "lora": {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 2},
    "dora": {"method": "dora", "targets": ["v_proj", "o_proj"], "r": 3},
    "vera": {"method": "vera", "targets": ["up_proj"], "r": 4},
    "ia3": {"method": "ia3", "targets": ["k_proj", "down_proj"], "feedforward": ["down_proj"]},
    "adapter": {"method": "adapter", "targets": ["o_proj"], "bottleneck": 4, "activation": "silu"},
}


def test_exported_served_model_takes_the_ids_as_an_input(tmp_path):
    family = FAMILIES["llama"]
    inputs = family.inputs(4, 3)
    _, cms = compile_family_specs(family, {name: {"adapters": [entry]} for name, entry in SPECS.items()},
                                  example_kwargs=inputs)
    for seed, name in enumerate(SPECS):
        randomize_adapters(cms[name], std=0.3, seed=seed)
    mm = peftc.serve_adapters(family.build(), cms, example_kwargs=inputs)
    session = ort.InferenceSession(str(peftc.export_onnx(mm, tmp_path / "served.onnx")))
    # a call without a mask binds to the all-ones mask (peftc.capture.binding), so the graph takes one
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "adapter_ids"]
    x = family.inputs(5, 6)  # another batch and length than the export's example
    outputs = []
    for ids in ([0, -1, 2, 1, 3], [4, 3, -1, 0, 4]):
        with torch.no_grad():
            want = logits(mm(**x, adapter_ids=ids)).numpy()
        feed = {"input_ids": x["input_ids"].numpy(), "attention_mask": np.ones_like(x["input_ids"].numpy()),
                "adapter_ids": np.array(ids, dtype=np.int64)}
        got = session.run(None, feed)[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        outputs.append(got)
    assert not np.allclose(outputs[0], outputs[1])  # the ids are read per run, not baked in

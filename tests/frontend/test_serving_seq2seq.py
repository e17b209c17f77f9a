"""serve_adapters on an encoder-decoder (T5): generate() decodes over the served forward, each row with its adapter."""

from __future__ import annotations

import torch

import peftc
from families import MORE_FAMILIES, randomize_adapters


def test_served_rows_generate_as_their_own_models(tmp_path):
    family = MORE_FAMILIES["t5"]
    model = family.build()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": list(family.all_linear), "r": 4}]}).eval()
    randomize_adapters(cm, std=0.3)
    cm.save_adapter(tmp_path, format="peft")
    served = peftc.serve_adapters(model, {"task": tmp_path})
    ids = family.inputs(2, 6)["input_ids"]
    # each forward call takes the served model's build lock: generate() must not hold it around them
    out = served.generate(ids, max_new_tokens=5, adapter_ids=["task", None])
    own, base = cm.generate(ids, max_new_tokens=5), model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[0], own[0]) and torch.equal(out[1], base[1])
    assert not torch.equal(own[0], base[0])  # the adapter changes the tokens

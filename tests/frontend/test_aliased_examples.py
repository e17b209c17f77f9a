"""An example call whose inputs are one tensor (`labels=input_ids`, as users write examples) captures a
graph that keeps them apart: later calls with other labels (-100 padding) or other ids equal peft's.

torch.export traces aliased inputs as one input; before peftc.capture.export.unaliased the token
embedding read `labels`, so other labels changed the logits and -100 failed with an IndexError.
"""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, llama, randomize_adapters
from hypothesis import given, settings
from hypothesis import strategies as st
from peft_reference import peft_lora
from test_virtual_generate import peft_model

import peftc

VOCAB = 128
LORA = {"method": "lora", "targets": ["q_proj", "v_proj"], "r": 4, "alpha": 8}
PROMPT = {"method": "prompt", "num_tokens": 3}


def _reference(cm, entry):
    if entry["method"] == "lora":
        return peft_lora(llama(), cm, ["q_proj", "v_proj"], r=4, alpha=8)
    return peft_model(FAMILIES["llama"], cm, entry)


@pytest.fixture(scope="module", params=[LORA, PROMPT], ids=lambda e: e["method"])
def aliased_pair(request):
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    cm = peftc.compile(llama(), {"adapters": [request.param]}, example_kwargs={"input_ids": ids, "labels": ids})
    randomize_adapters(cm, std=0.3)
    return cm.eval(), _reference(cm, request.param).eval()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), masked=st.integers(0, 5))
def test_labels_and_ids_stay_apart_after_an_aliased_example(aliased_pair, seed, masked):
    cm, reference = aliased_pair
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels = torch.randint(0, VOCAB, (2, 6), generator=g)
    labels[:, :masked] = -100
    with torch.no_grad():
        ours, theirs = cm(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels, use_cache=False)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, atol=1e-5, rtol=1e-5)

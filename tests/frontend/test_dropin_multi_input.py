"""Multi-input transformers models compile without hand-made example inputs (CLIPModel, T5), and
CLIP's get_text_features / get_image_features run with the adapters, as peft's model does."""

from __future__ import annotations


import pytest
import torch

import peftc
from families import randomize_adapters
from peft_reference import peft_lora

TARGETS = ["q_proj", "v_proj"]


def clip():
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "vocab_size": 99, "max_position_embeddings": 32}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)).eval()


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def clip_pair():
    model = clip()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": TARGETS, "r": 4, "alpha": 8}]}).eval()
    randomize_adapters(cm)
    return cm, peft_lora(model, cm, TARGETS, r=4, alpha=8).eval()


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 99, (3, 6), generator=g), "pixel_values": torch.randn(3, 3, 16, 16, generator=g)}


def test_clip_compiles_without_example_inputs_and_matches_peft(clip_pair):
    cm, reference = clip_pair
    inputs = _inputs()
    with torch.no_grad():
        ours, theirs = cm(**inputs), reference(**inputs)
    for key in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours.text_embeds, cm.compilation.source(**inputs).text_embeds, atol=1e-4)


@pytest.mark.parametrize("method, names", [("get_text_features", ["input_ids"]),
                                           ("get_image_features", ["pixel_values"])])
def test_clip_feature_methods_run_with_the_adapters(clip_pair, method, names):
    cm, reference = clip_pair
    inputs = {name: value for name, value in _inputs(1).items() if name in names}
    with torch.no_grad():
        ours, theirs = getattr(cm, method)(**inputs), getattr(reference, method)(**inputs)
        plain = getattr(cm.compilation.source, method)(**inputs)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours.pooler_output, plain.pooler_output, atol=1e-4)  # the adapters act


def test_clip_feature_method_refuses_what_the_original_refuses(clip_pair):
    cm, _ = clip_pair
    with pytest.raises(TypeError, match="pixel_value"):
        cm.get_image_features(pixel_value=torch.randn(2, 3, 16, 16))


def test_clip_feature_method_trains_the_shared_adapters(clip_pair):
    cm, _ = clip_pair
    cm.train()
    try:
        cm.get_text_features(**{"input_ids": _inputs(2)["input_ids"]}).pooler_output.sum().backward()
    finally:
        cm.eval()
    grads = [p.grad for name, p in cm.adapter_root.named_parameters() if "text_model" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    cm.zero_grad()


def test_t5_compiles_without_example_inputs_and_matches_peft():
    model = t5()
    cm = peftc.compile(model, {"adapters": [{"method": "lora", "targets": ["q", "v"], "r": 4, "alpha": 8}]}).eval()
    randomize_adapters(cm)
    reference = peft_lora(model, cm, ["q", "v"], r=4, alpha=8).eval()
    g = torch.Generator().manual_seed(3)
    ids, decoder_ids = torch.randint(1, 99, (2, 9), generator=g), torch.randint(1, 99, (2, 4), generator=g)
    with torch.no_grad():
        ours = cm(input_ids=ids, decoder_input_ids=decoder_ids).logits
        theirs = reference(input_ids=ids, decoder_input_ids=decoder_ids, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

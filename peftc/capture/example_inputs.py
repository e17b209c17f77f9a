"""Example inputs: the call peftc captures when the user gives none (transformers models).

HF models are captured from inputs built from `main_input_name` and the config; any other
model needs `example_inputs` (and `example_kwargs`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftc.capture.binding import bind_call
from peftc.capture.calls import forward_parameters, is_hf_model, normalize_call
from peftc.errors import CaptureError

EXAMPLE_BATCH = 2
EXAMPLE_SEQ = 7  # distinct from the batch size, so export does not unify the two dims
EXAMPLE_DECODER_SEQ = 5  # an encoder-decoder's target length, distinct from both


def example_call(model: nn.Module, example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """The (args, kwargs) to capture: the user's example, or one built for a transformers model."""
    if example_inputs is None and example_kwargs is None:
        if not is_hf_model(model):
            raise CaptureError(
                f"{type(model).__name__} is not a transformers model, so peftc cannot build example inputs; "
                "pass example_inputs=(tensor, ...) and/or example_kwargs={...} to peftc.compile")
        return normalize_call(model, *bind_call(model, (), hf_example_inputs(model)))
    if example_inputs is None:
        example_inputs = ()
    elif not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return normalize_call(model, *bind_call(model, example_inputs, dict(example_kwargs or {})))


def hf_example_inputs(model: nn.Module) -> dict:
    """Example inputs for a transformers model, built from `main_input_name` and the config.

    `model.dummy_inputs` is not enough: for vision models such as ViT it returns input_ids.
    """
    config = model.config
    name = model.main_input_name
    params = forward_parameters(model)
    device = _model_device(model)
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None) or 2
        ids = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_SEQ), device=device)
        inputs = {"input_ids": ids}
        if "attention_mask" in params:
            inputs["attention_mask"] = torch.ones_like(ids)
        return {**inputs, **_companion_inputs(model, params, vocab, device)}
    if name == "pixel_values":
        return {"pixel_values": _pixel_values(config, device, _model_dtype(model))}
    raise CaptureError(
        f"peftc cannot build example inputs for a model whose main input is {name!r}; "
        "pass example_inputs=(...) or example_kwargs={...} to peftc.compile"
    )


def _companion_inputs(model: nn.Module, params: list[str], vocab: int, device: torch.device) -> dict:
    """The inputs a text model needs beside its ids: an image for text-image models (CLIPModel), target
    ids for encoder-decoders (T5, BART), which fail without them."""
    config = model.config
    inputs = {}
    vision = getattr(config, "vision_config", None)
    if "pixel_values" in params and vision is not None:
        inputs["pixel_values"] = _pixel_values(vision, device, _model_dtype(model))
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = torch.randint(0, vocab, (EXAMPLE_BATCH, EXAMPLE_DECODER_SEQ), device=device)
    return inputs


def _pixel_values(config, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    size = _as_pair(getattr(config, "image_size", 224))
    channels = getattr(config, "num_channels", 3)
    return torch.randn(EXAMPLE_BATCH, channels, *size, device=device, dtype=dtype)


def _as_pair(size: Any) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return floats[0] if floats else torch.float32

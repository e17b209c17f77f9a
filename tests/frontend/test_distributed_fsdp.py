"""FSDP2 (`fully_shard`) over a compiled model on 2 gloo processes: what it shards and that it trains as one process."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import peftc
from distributed_harness import run_on_ranks
from distributed_lora import (
    LORA,
    STEPS,
    assert_dim0_chunk,
    assert_identical_across_ranks,
    assert_matches_single_process,
    batch,
    compiled_llama,
    rows,
    shard_shapes,
    single_process_run,
    train,
    trained_tensors,
)
from families import FAMILIES, randomize_adapters
from peftc.errors import ShardedError
from peftc.inspect.reachable import reachable_storage_bytes

pytestmark = pytest.mark.distributed
QUANTIZED = {"int8": {"bits": 8}, "nf4": {"bits": 4, "format": "nf4", "group_size": 32}}


def root_sharded_training(rank: int, world_size: int, steps: int, quantize: dict | None = None,
                          save_to: str | None = None, per_layer: bool = False) -> dict:
    cm = compiled_llama(quantize)
    unsharded = copy.deepcopy(cm) if save_to else None  # the fresh model the save is loaded into: no second compile
    parameters = {name for name, _ in cm.named_parameters()}
    for layer in cm.model.layers if per_layer else ():
        fully_shard(layer)
    fully_shard(cm)
    shapes = shard_shapes(cm)
    result = train(cm, rank, world_size, steps)
    packed = {name: b.numel() for name, b in cm.named_buffers() if ".quantized." in f".{name}"}
    packed_bytes = sum(b.numel() * b.element_size() for name, b in cm.named_buffers() if ".quantized." in f".{name}")
    if save_to:
        result["reloaded"] = saved_and_loaded_into_a_fresh_sharded_model(cm, save_to, unsharded)
    return result | {"parameters": parameters, "shapes": shapes, "packed": packed, "packed_bytes": packed_bytes,
                     "kept": reachable_storage_bytes(cm), "whole": sum(p.numel() * p.element_size() for p in cm.parameters())}


def saved_and_loaded_into_a_fresh_sharded_model(cm, directory: str, fresh) -> dict[str, torch.Tensor]:
    """Every rank saves (rank 0 writes whole tensors) and loads into `fresh` (an untrained, unsharded compiled
    model: a deepcopy of compiled_llama()'s, made before `cm` was sharded), sharded, with other adapters."""
    cm.save_adapter(directory)
    cm.save_adapter(directory + "-peft", format="peft")
    randomize_adapters(fresh, seed=7)
    fully_shard(fresh)
    fresh.load_adapter(directory)
    return trained_tensors(fresh)


def reference_logits(cm, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return cm(input_ids=batch(steps)).logits


def every_sharding_recipe(rank: int, world_size: int, steps: int, save_to: str) -> dict:
    """The three recipes the tests below check, in the same two processes: each rank is a fresh Python that
    imports torch, transformers and peftc (seconds of CPU), so one process start serves all of them.
    Each recipe compiles its own models; none reads another's state."""
    return {"root": root_sharded_training(rank, world_size, steps, save_to=save_to),
            "quantized": quantized_bases_trained(rank, world_size, 2),
            "layers": layer_sharded_runs(rank, world_size, steps)}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[list[dict], Path]:
    """Every rank's results (by recipe), and the folder the root recipe saved into."""
    saved = tmp_path_factory.mktemp("fsdp") / "a"
    runs = run_on_ranks(every_sharding_recipe, world_size=2, timeout=450, steps=STEPS, save_to=str(saved))
    return runs, saved


@pytest.fixture(scope="module")
def single_process():
    """The single-process run on the whole batch every sharded run is compared with (tests only read it)."""
    return single_process_run()


def test_fully_shard_on_the_root_shards_every_parameter_and_trains_as_one_process(sharded, single_process, tmp_path):
    runs, saved_to = sharded
    results = [run["root"] for run in runs]
    cm, reference = single_process
    assert_identical_across_ranks(results)
    assert_matches_single_process(results, reference)
    for rank, result in enumerate(results):
        assert result["shapes"].keys() == result["parameters"]  # base weights and adapters: all sharded
        assert_dim0_chunk(result["shapes"], rank, 2)
        local = sum(shape.numel() for shape, _ in result["shapes"].values())
        whole = sum(full.numel() for _, full in result["shapes"].values())
        assert abs(local - whole / 2) <= 0.01 * whole
        for name, tensor in result["reloaded"].items():  # sharded load: each rank kept its part of the file
            assert torch.equal(tensor, result["adapters"][-1][name]), name
    saved = load_file(str(saved_to / "adapter.safetensors"))  # whole tensors, as one process saves them
    assert saved.keys() == cm.adapter_state_dict().keys()
    for name, tensor in cm.adapter_state_dict().items():
        assert saved[name].shape == tensor.shape
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-5)
    cm.save_adapter(tmp_path / "one-process-peft", format="peft")
    in_peft_format = load_file(str(saved_to.with_name("a-peft") / "adapter_model.safetensors"))
    one_process = load_file(str(tmp_path / "one-process-peft" / "adapter_model.safetensors"))
    assert in_peft_format.keys() == one_process.keys() and one_process
    for key, tensor in one_process.items():
        torch.testing.assert_close(in_peft_format[key], tensor, rtol=0, atol=1e-5)


def quantized_bases_trained(rank: int, world_size: int, steps: int) -> dict:
    """Each quantized format in turn, in the same two processes (one process start for both)."""
    return {fmt: root_sharded_training(rank, world_size, steps, quantize, per_layer=True)
            for fmt, quantize in QUANTIZED.items()}


def test_a_quantized_base_trains_under_fsdp2_with_its_packed_weights_replicated(sharded):
    """Sharded per layer then the root. FSDP2 shards parameters; packed base weights are buffers (they never
    train), so each rank keeps them whole (a fraction of the float weights' bytes, but not 1/world of them)."""
    runs = [run["quantized"] for run in sharded[0]]
    for fmt, quantize in QUANTIZED.items():
        results = [run[fmt] for run in runs]
        reference = train(compiled_llama(quantize), steps=2)
        assert_identical_across_ranks(results)
        assert_matches_single_process(results, reference)
        for rank, result in enumerate(results):
            assert_dim0_chunk(result["shapes"], rank, 2)  # norms, embeddings, head, adapters
            assert result["shapes"].keys() == result["parameters"]
            assert not any(".quantized." in f".{name}" for name in result["shapes"])
            assert len(result["packed"]) >= 28, fmt  # 7 projections x 2 layers, each with codes and scales
        assert results[0]["packed"] == results[1]["packed"]
        for result in results:  # the float weights' shards plus the packed weights, whole: nothing else kept
            assert result["kept"] <= result["whole"] / 2 + result["packed_bytes"] + 4 * 1024, fmt


def layer_sharded_training(rank: int, world_size: int, steps: int, checkpointing: bool) -> dict:
    """torchtune's recipe: fully_shard each compiled layer, then the root; train; a new call signature."""
    cm = compiled_llama()
    if checkpointing:
        cm.gradient_checkpointing_enable()
    layers = list(cm.model.layers)
    assert len(layers) == 2 and all(layer is cm.get_submodule(f"model.layers.{i}") for i, layer in enumerate(layers))
    base_weights = [{name for name, _ in layer.named_parameters()} for layer in layers]
    for layer in layers:
        fully_shard(layer)
    fully_shard(cm)
    seen_by_second_layer = []  # while layer 1 runs: is layer 0 back to its shard, and layer 1 whole?
    layers[1].register_forward_pre_hook(lambda module, args: seen_by_second_layer.append(
        (isinstance(layers[0].get_parameter("self_attn.q_proj.weight"), DTensor),
         isinstance(layers[1].get_parameter("self_attn.q_proj.weight"), DTensor))))
    layer_shapes = [shard_shapes(layer) for layer in layers]
    result = train(cm, rank, world_size, steps)
    kept = reachable_storage_bytes(cm)  # every storage the compiled model (and its compilation) keeps alive
    whole = sum(p.numel() * p.element_size() for p in cm.parameters())  # a DTensor's numel is the whole tensor's
    ids = rows(batch(steps), rank, world_size)
    with torch.no_grad():  # call signatures with no graph yet: built after sharding, on the same layers
        result["logits"] = cm(input_ids=ids).logits  # derived from the superset graph
        result["masked_logits"] = cm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # captured
    result["refused"] = refusals(cm, ids)
    result["kept_after_new_signatures"] = resharded_bytes(cm)
    # Last: FSDP2 leaves the root gathered after a forward that raised (its state stays "forward").
    # No gradients: under checkpointed training use_cache=True is dropped, as the original drops it.
    with torch.no_grad(), pytest.raises(ShardedError, match="one process") as caught:  # needs whole weights
        cm(input_ids=ids, use_cache=True)
    result["cache_refused"] = str(caught.value)
    with pytest.raises(RuntimeError, match="indices") as caught:  # the original model's error, as on one process
        cm(input_ids=ids.float())
    result["float_ids_error"] = str(caught.value)
    return result | {"base_weights": base_weights, "layer_shapes": layer_shapes, "shapes": shard_shapes(cm),
                     "seen_by_second_layer": seen_by_second_layer,
                     "checkpointed": [layer.checkpointed for layer in layers], "kept": kept, "whole": whole}


def resharded_bytes(cm) -> int:
    """Storage reachable once FSDP2 resharded: the root keeps its parameters gathered after a forward with no
    backward (reshard_after_forward is off on the root), which is FSDP2's choice, not something peftc keeps."""
    cm.reshard()
    return reachable_storage_bytes(cm)


def refusals(cm, ids) -> list[str]:
    """What needs whole base weights raises ShardedError on a sharded model, naming where to do it instead."""
    messages = []
    with tempfile.TemporaryDirectory(prefix="peftc-sharded-") as directory:
        onnx = Path(directory) / "never.onnx"
        for needs_whole_weights in (cm.merged, cm.merge_and_unload, lambda: cm.generate(ids, max_new_tokens=2),
                                    lambda: peftc.export_onnx(cm, onnx)):
            with pytest.raises(ShardedError, match="one process") as caught:
                needs_whole_weights()
            messages.append(str(caught.value))
        assert not onnx.exists()
    return messages


def peft_layer_sharded(rank: int, world_size: int, steps: int) -> int:
    """HF PEFT under the same recipe: the bytes its model keeps alive after training."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["targets"], lora_dropout=0.0)
    model = get_peft_model(FAMILIES["llama"].build(), config).train()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    train(model, rank, world_size, steps)
    return reachable_storage_bytes(model)


def layer_sharded_runs(rank: int, world_size: int, steps: int) -> dict:
    """Without and with activation checkpointing, and HF PEFT, in the same two processes (one process start for all)."""
    runs = {checkpointing: layer_sharded_training(rank, world_size, steps, checkpointing) for checkpointing in (False, True)}
    return runs | {"peft_kept": peft_layer_sharded(rank, world_size, steps)}


def test_fully_shard_per_compiled_layer_then_root_trains_as_one_process_with_and_without_checkpointing(sharded, single_process):
    """...and each rank keeps only its shards alive (as HF PEFT does): every storage reachable from the compiled
    model, its graphs and its compilation (the capture source included) is this rank's half of each weight."""
    runs = [run["layers"] for run in sharded[0]]
    cm, reference = single_process
    expected_logits = reference_logits(cm, STEPS)
    with pytest.raises(RuntimeError) as one_process_error:
        cm(input_ids=batch(STEPS).float())
    for checkpointing in (False, True):
        results = [run[checkpointing] for run in runs]
        assert_identical_across_ranks(results)
        assert_matches_single_process(results, reference)
        for rank, result in enumerate(results):
            assert result["checkpointed"] == [checkpointing] * 2
            for weights, shapes in zip(result["base_weights"], result["layer_shapes"]):
                assert shapes.keys() == weights and len(weights) == 9  # 7 projections, 2 norms: each a shard
                assert_dim0_chunk(shapes, rank, 2)
            assert_dim0_chunk(result["shapes"], rank, 2)  # the root's too: embeddings, norm, head, adapters
            # One layer whole at a time: layer 0 is back to its shard when layer 1 runs, layer 1 gathered.
            assert result["seen_by_second_layer"] and all(seen == (True, False) for seen in result["seen_by_second_layer"])
            torch.testing.assert_close(result["logits"], rows(expected_logits, rank, 2), rtol=0, atol=1e-5)
            torch.testing.assert_close(result["masked_logits"], rows(expected_logits, rank, 2), rtol=0, atol=1e-5)
            assert len(result["refused"]) == 4 and "KV cache" in result["cache_refused"]
            assert result["float_ids_error"] == str(one_process_error.value)
            whole = result["whole"]  # every base weight and adapter, all sharded: each rank keeps half of them
            assert whole > 300_000 and result["kept"] <= whole / 2 + 4 * 1024, (rank, checkpointing, result["kept"], whole)
            assert result["kept_after_new_signatures"] <= whole / 2 + 4 * 1024
            assert result["kept"] <= runs[rank]["peft_kept"] * 1.01, (result["kept"], runs[rank]["peft_kept"])


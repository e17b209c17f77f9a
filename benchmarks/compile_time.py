"""Where peftc.compile spends its time on a LLaMA-7B-shaped model built on the meta device.

    OMP_NUM_THREADS=1 python benchmarks/compile_time.py [--layers 32] [--full-export] [--profile]
    OMP_NUM_THREADS=1 python benchmarks/compile_time.py --per-layer [--static]

LoRA r=16 on the 7 projections of every layer (hidden 4096, intermediate 11008, vocab 32000).
Prints wall and CPU seconds (the CPU time of this process: on a shared machine it moves less
than wall time) for the whole compile and its parts: torch.export, unlifting the program
(`ExportedProgram.module()`), copying layers (peftc.capture.layer_stacks), the pass pipeline, and the
rest. `--full-export` exports every layer (compile(copy_layers=False)), the way peftc did
before layer copying. `--profile` also prints cProfile's top functions by cumulative time.
`--per-layer` instead times torch.export of every layer alone (dynamic dims, or `--static`),
to show what exporting a layer costs.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time
from collections.abc import Iterator

import torch
from common import llama_config, machine

import peftc

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_7b_on_meta(layers: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    cfg = llama_config(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


class Clock:
    """Wall and CPU seconds spent inside the wrapped functions, by part name."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def timing(self, owner: object, attr: str, part: str) -> Iterator[None]:
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.wall[part] = self.wall.get(part, 0.0) + time.perf_counter() - wall
                self.cpu[part] = self.cpu.get(part, 0.0) + time.process_time() - cpu

        setattr(owner, attr, timed)
        try:
            yield
        finally:
            setattr(owner, attr, original)


def timed_parts(clock: Clock) -> contextlib.ExitStack:
    """Wrap the functions whose time the breakdown shows (for this benchmark run only)."""
    from torch.export.exported_program import ExportedProgram

    from peftc.capture import layer_stacks
    from peftc.compiler import compile as compiler

    stack = contextlib.ExitStack()
    stack.enter_context(clock.timing(torch.export, "export", "torch.export"))
    stack.enter_context(clock.timing(ExportedProgram, "module", "unlift (ExportedProgram.module)"))
    stack.enter_context(clock.timing(layer_stacks, "copy_layers", "copy layers"))
    stack.enter_context(clock.timing(compiler, "run_pipeline", "passes (pipeline: lint, invariants)"))
    return stack


def compile_once(layers: int, copy_layers: bool, profile: bool) -> tuple[float, float, Clock]:
    model = llama_7b_on_meta(layers)
    spec = {"adapters": [{"method": "lora", "targets": TARGETS, "r": 16, "alpha": 32}]}
    clock = Clock()
    profiler = cProfile.Profile() if profile else None
    with timed_parts(clock):
        wall, cpu = time.perf_counter(), time.process_time()
        if profiler:
            profiler.enable()
        cm = peftc.compile(model, spec, copy_layers=copy_layers)
        if profiler:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert len(cm.report().sites) == layers * 7
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    return wall, cpu, clock


def export_per_layer(layers: int, static: bool) -> None:
    """CPU seconds of each decoder layer and of the causal mask during one full torch.export."""
    from transformers.models.llama import modeling_llama

    from peftc.capture.calls import normalize_call
    from peftc.capture.example_inputs import hf_example_inputs
    from peftc.capture.export import capture

    model = llama_7b_on_meta(layers)
    clock = Clock()
    layer_times: list[float] = []
    original = modeling_llama.LlamaDecoderLayer.forward

    def timed_layer(self, *args, **kwargs):
        start = time.process_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            layer_times.append(time.process_time() - start)

    _, kwargs = normalize_call(model, (), hf_example_inputs(model))
    modeling_llama.LlamaDecoderLayer.forward = timed_layer
    try:
        with clock.timing(modeling_llama, "create_causal_mask", "mask"):
            start = time.process_time()
            if static:
                torch.export.export(model.train(), (), kwargs, strict=False)
            else:
                capture(model, (), kwargs, copy_layers=False)
            total = time.process_time() - start
    finally:
        modeling_llama.LlamaDecoderLayer.forward = original
    rest = layer_times[1:]
    print(f"torch.export of {layers} layers, {'static' if static else 'dynamic batch/seq'}: {total:.2f} s CPU; "
          f"causal mask {clock.cpu['mask']:.2f} s; layer 0 {layer_times[0]:.2f} s, layer 1 {layer_times[1]:.2f} s, "
          f"mean of layers 1.. {sum(rest) / len(rest):.3f} s; all layers {sum(layer_times):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--full-export", action="store_true", help="export every layer (copy_layers=False)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions")
    parser.add_argument("--per-layer", action="store_true", help="time torch.export per layer instead")
    parser.add_argument("--static", action="store_true", help="with --per-layer: static shapes")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    if args.per_layer:
        export_per_layer(args.layers, args.static)
        return
    wall, cpu, clock = compile_once(args.layers, not args.full_export, args.profile)
    how = "every layer exported" if args.full_export else "layers copied"
    print(f"compile LLaMA-7B shape on meta, {args.layers} layers, {how}: {wall:.2f} s wall, {cpu:.2f} s CPU")
    parts = [(name, clock.wall[name], clock.cpu[name]) for name in clock.wall]
    rest_wall, rest_cpu = wall - sum(w for _, w, _ in parts), cpu - sum(c for _, _, c in parts)
    for name, w, c in parts:
        print(f"  {name:38s} {w:6.2f} s wall {c:6.2f} s CPU")
    print(f"  {'other (example inputs, sites, wrapping)':38s} {rest_wall:6.2f} s wall {rest_cpu:6.2f} s CPU")


if __name__ == "__main__":
    main()

"""Layer modules of a layer-structured graph: a layer's parameters, and the code that runs it.

After the passes, each layer of a stack of identical layers (`model.layers.3`) is outlined
from the flat graph (passes/structure_layers.py) into a `CompiledLayer` registered at the
layer's own path. The layer module owns that layer's base parameters at their original
relative paths (`self_attn.q_proj.weight`), so `fully_shard(cm.model.layers[3])`, DDP buckets
and `named_parameters()` see the model's own structure; the top graph calls it once per layer.

The code is a `LayerProgram`: one generated `forward(self, *inputs)` per *distinct* layer
graph, shared by every layer whose graph is the same (the key is the graph's structure, not
its node names), so Python compiles one code object and torch.compile one graph for a
stack. A layer may hold several programs (other call signatures, train/eval): the top
graph names the one it needs with the `program=` keyword.

Inputs that are not the layer's own parameters (activations, the attention mask, adapter
parameters, constants) come in as arguments: activations first, then the `num_held`
values that stay alive anyway (read by several layers, or tensors the model holds), which
activation checkpointing keeps by reference instead of saving.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils.checkpoint import checkpoint

COMPILER_BACKEND = "inductor"  # what torch.compile lowers layer programs with (tests use "eager" to count graphs)


class LayerProgram:
    """One distinct layer graph: its code (from `body`, a GraphModule holding no tensors) and, with
    the inductor back end, that code compiled once by torch.compile for every layer that runs it."""

    def __init__(self, key: str, body: GraphModule, num_held: int, compiled: bool = False,
                 recomputable: bool = True):
        self.key = key
        self.body = body  # graph + generated code only: its tensors live on the layers
        self.num_held = num_held
        self.compiled = compiled
        self.recomputable = recomputable  # False: it updates a tensor in place, so it is never checkpointed
        self._compiled_code: dict[object, object] = {}  # generated function -> torch.compile'd

    @property
    def graph(self) -> torch.fx.Graph:
        return self.body.graph

    @property
    def code(self) -> str:
        return self.body.code

    @property
    def function(self):
        """The generated `forward(self, *inputs)`; regenerated when the body is recompiled (mode switch)."""
        return type(self.body).forward

    def run(self, layer: nn.Module, *inputs):
        function = self.function
        if self.compiled:
            function = self._compiled_code.get(function) or self._compile(function)
            inputs = self._grad_alike(inputs)
        return function(layer, *inputs)

    def _grad_alike(self, inputs: tuple) -> tuple:
        """The first layer's activations as the others' are, requiring grad: torch.compile specializes
        on requires_grad, and a frozen embedding's output would cost a second compile of the same
        program. Its history is frozen, so the extra input gradient reaches no parameter."""
        if not torch.is_grad_enabled():
            return inputs
        split = len(inputs) - self.num_held
        return tuple(x.detach().requires_grad_() if i < split and isinstance(x, torch.Tensor)
                     and x.is_floating_point() and not x.requires_grad else x for i, x in enumerate(inputs))

    def _compile(self, function):
        compiled = torch.compile(function, backend=COMPILER_BACKEND)
        self._compiled_code[function] = compiled
        return compiled

    def __repr__(self) -> str:
        return f"LayerProgram({self.key}, nodes={len(self.graph.nodes)}, compiled={self.compiled})"


class CompiledLayer(nn.Module):
    """A layer of the compiled model at its original path: its base parameters and its programs."""

    def __init__(self, path: str, original: nn.Module):
        super().__init__()
        self.path = path
        self.programs: dict[str, LayerProgram] = {}
        self.checkpointed = False  # recompute activations in backward (gradient checkpointing)
        # Adopt the captured layer's tensors and submodules: same objects, same relative names.
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        self._modules = original._modules

    def forward(self, *inputs, program: str):
        code = self.programs[program]
        if not (self.checkpointed and code.recomputable and torch.is_grad_enabled()):
            return code.run(self, *inputs)
        return recomputed(lambda *xs: code.run(self, *xs), inputs, code.num_held)

    def add_programs(self, programs: dict[str, LayerProgram]) -> None:
        for key, program in programs.items():
            self.programs.setdefault(key, program)

    def __getstate__(self):
        # Generated code cannot be pickled: a compiled model rebuilds its graphs (and programs) on load.
        state = self.__dict__.copy()
        state["programs"] = {}
        return state

    def extra_repr(self) -> str:
        return f"path={self.path!r}, programs={list(self.programs)}, checkpointed={self.checkpointed}"


def recomputed(run, inputs: tuple, num_held: int):
    """`run(*inputs)` under torch.utils.checkpoint: activations recomputed in backward.

    The last `num_held` inputs reach `run` through the closure, not as checkpoint inputs:
    checkpoint saves its inputs for backward, and weights and shared masks stay alive anyway.
    """
    split = len(inputs) - num_held
    activations, held = inputs[:split], inputs[split:]
    return checkpoint(lambda *xs: run(*xs, *held), *activations, use_reentrant=False)


def compiled_layers(module: nn.Module) -> list[CompiledLayer]:
    """The CompiledLayers under `module`, in module order (layer 0 first within a stack)."""
    return [m for m in module.modules() if isinstance(m, CompiledLayer)]


def program_bodies(module: nn.Module) -> list[GraphModule]:
    """Each distinct program body under `module`, once."""
    seen: dict[int, GraphModule] = {}
    for layer in compiled_layers(module):
        for program in layer.programs.values():
            seen.setdefault(id(program.body), program.body)
    return list(seen.values())

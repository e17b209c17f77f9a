"""LoRA weights as overridable graph inputs, so one exported model serves many adapters.

Each `peftc.<site>.<slot>.A` / `.B` becomes a graph input whose rank axis is symbolic
(`peftc.<site>.<slot>.rank`, shared by the pair) and whose default (its initializer) has rank 0: with no adapter active the
branch adds zeros and the model runs base-only. ONNX Runtime's LoRA adapter files feed the
same names (see adapter_file.py), one adapter per run.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from peftc.ir import adapters


def lora_names(graph: ir.Graph) -> list[str]:
    """Initializer names of LoRA factors in the exported graph."""
    prefix = adapters.ROOT + "."
    return [name for name in graph.initializers if name.startswith(prefix) and name.rsplit(".", 1)[-1] in "AB"]


def rank_axis(name: str) -> int:
    """A is [r, in, ...]; B is [out, r, ...]."""
    return 0 if name.endswith(".A") else 1


def promote_lora_inputs(graph: ir.Graph) -> list[str]:
    """Turn every LoRA factor initializer into a graph input with a zero-rank default."""
    names = lora_names(graph)
    for name in names:
        value = graph.initializers[name]
        axis = rank_axis(name)
        dims = list(value.shape)
        dims[axis] = 0
        value.const_value = ir.tensor(np.zeros(dims, dtype=value.const_value.numpy().dtype), name=name)
        dims[axis] = ir.SymbolicDim(name.rpartition(".")[0] + ".rank")
        value.shape = ir.Shape(dims)
        graph.inputs.append(value)
    return names


"""merge_and_unload: the compiled model's adapters folded into a model of the original class.

`CompiledModel.merged()` gives a graph whose parameters, by fully qualified name, are the
original model's names with every foldable adapter folded in (and, on a quantized base, the
weights back in full precision). Unloading writes those tensors into the original module
structure — a copy of it by default, the user's model with `inplace=True` — so the result is
the same class as the user's (a transformers `PreTrainedModel` subclass keeps its config,
`save_pretrained` and `generate`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.ir import adapters
from peftc.ir.graph_edit import provenance


def merge_and_unload(source: nn.Module, merged_graph: GraphModule, *, inplace: bool = False) -> nn.Module:
    """`source` (the compiled model's source module) with the weights of `merged_graph` set on it.

    `inplace=False` returns a new module and leaves `source` untouched; `inplace=True` writes
    the merged weights into `source` and returns it.
    """
    refuse_unfolded(merged_graph)
    weights = changed_weights(source, merged_graph)
    if inplace:
        return _write_into(source, weights)
    return _copy_with(source, weights)


def refuse_unfolded(gm: GraphModule) -> None:
    """A SpecError naming every adapter the merge left as graph ops (prefix, prompt, gated ...)."""
    kept: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        tag = provenance(node)
        if tag and "method" in tag:
            kept.setdefault(tag["method"], set()).add(str(tag.get("site", "?")))
    if kept:
        listed = "; ".join(f"{method} at {', '.join(sorted(sites)[:3])}" + (" ..." if len(sites) > 3 else "")
                           for method, sites in sorted(kept.items()))
        raise SpecError(
            f"merge_and_unload: these adapters cannot be folded into the base weights: {listed}. "
            "They change the computation, not a weight; keep the compiled model (cm.save_adapter(dir) "
            "and peftc.compile to load it again), or export it with peftc.export_onnx")


def changed_weights(source: nn.Module, gm: GraphModule) -> dict[str, torch.Tensor]:
    """Parameters of `gm` (by FQN) that are not the very tensors `source` already holds."""
    current = dict(source.named_parameters(remove_duplicate=False))
    changed = {}
    for name, value in gm.named_parameters(remove_duplicate=False):
        if name.startswith(adapters.ROOT + "."):
            continue
        if name not in current:
            raise RuntimeError(f"merged graph parameter {name!r} has no place in {type(source).__name__}")
        if value is not current[name]:
            changed[name] = value
    return changed


def _copy_with(source: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of `source` whose parameters named in `weights` are new Parameters holding them.

    The memo hands deepcopy the merged Parameter for each replaced one, so a replaced weight is
    never copied first, and weights tied under several names stay tied.
    """
    named = dict(source.named_parameters(remove_duplicate=False))
    memo: dict[int, object] = {}
    for name, value in weights.items():
        old = named[name]
        if id(old) in memo:
            continue
        memo[id(old)] = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    return copy.deepcopy(source, memo)


def _write_into(source: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    named = dict(source.named_parameters(remove_duplicate=False))
    placeholders = [name for name in weights if _is_placeholder(named[name])]
    if placeholders:
        raise SpecError(
            "merge_and_unload(inplace=True): the compiled model was quantized, so it no longer holds the "
            f"user's full-precision weights (e.g. {placeholders[0]!r}) to write into; use inplace=False, "
            "which returns a new model in full precision")
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    return source


def _is_placeholder(param: torch.Tensor) -> bool:
    """The zero-storage stand-ins a quantized compile keeps instead of full-precision weights."""
    return param.dim() > 0 and 0 in param.stride()

"""add_routing_input: give a captured graph the per-row adapter ids as one more (keyword) input.

A served graph must read each call's adapter ids as data, not from a buffer set per call: a
buffer is state, so two threads calling one served model would read each other's ids, and an
exported graph would bake the ids in as a constant. torch.export's `.module()` graph flattens
its inputs with a pytree spec, `(args, kwargs)`; this pass appends a placeholder after the
last one and the keyword `adapter_ids` to that spec, so the graph is called as
`gm(*args, **kwargs, adapter_ids=ids)` and later passes read the ids from the placeholder.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from peftc.pipeline.runner import PassContext, PassResult

ROUTING_INPUT = "adapter_ids"  # the keyword the served graph takes: int64 [batch], -1 = the base alone


def add_routing_input(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Append the placeholder `adapter_ids` (int64 [batch]) and its keyword to the input spec."""
    if routing_input(gm) is not None:
        return PassResult(modified=False)
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or not _is_args_kwargs(info.in_spec):
        raise TypeError("add_routing_input: expected a torch.export graph module (inputs flattened by a pytree spec)")
    if ROUTING_INPUT in info.in_spec.child(1).context:
        raise ValueError(f"the model already takes a keyword {ROUTING_INPUT!r}; serving needs that name for its ids")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        ids = gm.graph.placeholder(ROUTING_INPUT)
    ids.meta["peftc"] = {"role": "routing_input"}
    batch = _batch_value(placeholders)
    if batch is not None:  # int64 [batch], the batch dim shared with the model's inputs (export reads it)
        ids.meta["val"] = batch
    args_spec, kwargs_spec = info.in_spec.children()
    kwargs_spec = pytree.TreeSpec(dict, [*kwargs_spec.context, ROUTING_INPUT],
                                  [*kwargs_spec.children(), pytree.treespec_leaf()])
    in_spec = pytree.TreeSpec(tuple, None, [args_spec, kwargs_spec])
    codegen.pytree_info = info._replace(orig_args=[*info.orig_args, ROUTING_INPUT], in_spec=in_spec)
    gm._in_spec = in_spec  # torch.export's pre-hook checks calls against this spec
    return PassResult(modified=True, notes=[f"input {ROUTING_INPUT!r}: one adapter id per batch row"])


def routing_input(gm: GraphModule) -> Node | None:
    """The graph's adapter-ids placeholder, if add_routing_input gave it one."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if node.meta.get("peftc", {}).get("role") == "routing_input":
            return node
    return None


def _is_args_kwargs(spec) -> bool:
    return (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
            and spec.child(1).type is dict)



def _batch_value(placeholders: list[Node]):
    """A fake int64 [batch] tensor whose dim is the first tensor input's batch dim (None if none)."""
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and getattr(val, "fake_mode", None) is not None:
            with val.fake_mode:
                return torch.empty(val.shape[0], dtype=torch.long, device=val.device)
    return None

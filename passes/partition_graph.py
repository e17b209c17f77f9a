"""partition_graph: tag each node with the program that runs it (frozen base or user adapters) and its stage.

The DLoRA split (peftc.partition): the user program holds the adapters, the base program
everything else, and only the values on cut edges travel. Sides:

- user: every node an adapter pass inserted that depends on an adapter tensor, and the
  adapter-inserted nodes (a dropout of a site input) that feed only user nodes, so the site
  input itself crosses once however many sites read it;
- base: everything else, including an adapter's closing `add(y, delta)`/`sub(...)` whose
  result only the base reads: the delta travels back instead of y going over and y + delta back.

Stages, as early as the dependencies allow: a base node runs in the stage after the latest user
value it reads, a user node in the stage of its latest input. So every cut value that can
travel in one exchange does (the q, k and v sites fed by one normalized hidden state, and their
three deltas), and a layer costs as many exchanges as its chain of adapted ops is deep.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from peftc.errors import PartitionError
from peftc.ir.graph_edit import provenance
from peftc.ir.partition import BASE, PARTITION_KEY, USER, Placement, cut_of, is_adapter_tensor
from peftc.pipeline.runner import PassContext, PassResult

aten = torch.ops.aten
MERGE_OPS = (aten.add.Tensor, aten.sub.Tensor)


def partition_graph(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Tag every node with meta["peftc_partition"] = Placement(side, stage)."""
    if ctx.trainable:
        raise PartitionError(f"partition: the spec trains base parameters ({sorted(ctx.trainable)[:3]} ...), which "
                             "the frozen base program cannot update; drop `trainable` from the spec, or train "
                             "copies of them with the `copy` method")
    sides = _sides(gm)
    _check_user_reads(gm, sides)
    stages = _stages(gm, sides)
    modified = False
    for node in gm.graph.nodes:
        tag = Placement(sides[node], stages[node])
        modified = modified or node.meta.get(PARTITION_KEY) != tag
        node.meta[PARTITION_KEY] = tag
    cut = cut_of(gm.graph)
    notes = [f"{len(cut.exchanges)} exchanges, {len(cut.crossing)} crossing values"]
    return PassResult(modified=modified, notes=notes)


def _inserted_by_method(node: Node) -> bool:
    tag = provenance(node)
    return bool(tag and tag.get("method"))


def _sides(gm: GraphModule) -> dict[Node, str]:
    sides: dict[Node, str] = {}
    for node in gm.graph.nodes:
        if is_adapter_tensor(node):
            sides[node] = USER
        elif node.op == "call_function" and node.target is operator.getitem:
            sides[node] = sides[node.args[0]]  # a tuple never crosses: its items stay with it
        elif _inserted_by_method(node) and any(sides[n] == USER for n in node.all_input_nodes):
            sides[node] = USER
        else:
            sides[node] = BASE
    _sink_merges(gm, sides)
    _pull_inputs(gm, sides)
    return sides


def _sink_merges(gm: GraphModule, sides: dict[Node, str]) -> None:
    """add(y, delta) / sub(y, delta) read only by the base: run it in the base, so only delta crosses."""
    for node in gm.graph.nodes:
        if sides[node] != USER or node.target not in MERGE_OPS or not node.users:
            continue
        if any(sides[u] == USER for u in node.users) or len(node.args) < 2:
            continue
        base_arg, delta = node.args[0], node.args[1]
        if isinstance(base_arg, Node) and isinstance(delta, Node) and sides[base_arg] == BASE \
                and sides[delta] == USER and _same_shape(node, delta):
            sides[node] = BASE


def _pull_inputs(gm: GraphModule, sides: dict[Node, str]) -> None:
    """Adapter-inserted base nodes (a dropout of the site input) that only the user reads run in the user."""
    for node in reversed(gm.graph.nodes):
        if sides[node] == BASE and _inserted_by_method(node) and node.op == "call_function" and node.users \
                and all(sides[u] == USER for u in node.users):
            sides[node] = USER


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def _check_user_reads(gm: GraphModule, sides: dict[Node, str]) -> None:
    """The user program holds adapter tensors only: a base parameter read by an adapter op is an error;
    an adapter tensor read by a base op is a bug in the placement."""
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            if source.op != "get_attr":
                continue
            if sides[node] == USER and not is_adapter_tensor(source) and _is_parameter(gm, source.target):
                method = (provenance(node) or {}).get("method")
                raise PartitionError(
                    f"partition: the {method} adapter at {(provenance(node) or {}).get('site')!r} reads the base "
                    f"weight {source.target!r} (node {node.name}); the user program holds adapter tensors only. "
                    "Partition methods whose adapters read activations (lora, ia3, adapter, prompt, prefix, ...), "
                    "or merge the weight-reading adapter first")
            if sides[node] == BASE and is_adapter_tensor(source):
                raise PartitionError(f"partition: base op {node.name} ({node.target}) reads adapter tensor "
                                     f"{source.target!r} directly; this adapter op carries no peftc provenance tag "
                                     "(a bug in the pass that inserted it)")


def _is_parameter(gm: GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _stages(gm: GraphModule, sides: dict[Node, str]) -> dict[Node, int]:
    stages: dict[Node, int] = {}
    for node in gm.graph.nodes:
        ready = 0
        for source in node.all_input_nodes:
            if source.op == "get_attr":
                continue  # read in place by every stage that needs it
            crossed = sides[source] == USER and sides[node] == BASE
            ready = max(ready, stages[source] + (1 if crossed else 0))
        stages[node] = ready
    return stages

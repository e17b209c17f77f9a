"""fuse_lora_shrinks: LoRA branches that read the same input node share one shrink matmul.

insert_lora leaves `linear(h, A_i)` per site. Where several sites read the same node h
(LLaMA's q/k/v read one normed hidden state, gate/up another), one
`peftc::packed_shrink(h, [A_1..A_n])` (linear(h, cat(A_i)), peftc.ir.packed_shrink) followed
by a split by rank reads h once and runs one bigger matmul (Punica/vLLM's packed QKV LoRA).
The A's stay separate parameters: the cat happens inside the op, so their names, gradients
and checkpoints are unchanged, and backward saves the A's, not a concatenated copy of them.

Exactness decides what is fused: h must be the *same node*. Sites with LoRA dropout each read
their own dropout node (their own random mask in training), so they are never fused: the graph
serves train and eval alike, and in training one shared mask would change the model.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from peftc.core.paths import group_paths
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter, provenance
from peftc.ir.modes import DROPOUT_OPS
from peftc.ir import packed_shrink
from peftc.pipeline.runner import PassContext, PassResult

aten = torch.ops.aten
PASS = "fuse_lora_shrinks"


def fuse_lora_shrinks(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Replace the LoRA shrinks linear(h, A_i) that share their input h by linear(h, cat(A_i)) and a split."""
    result = PassResult(modified=False)
    by_input = _shrinks_by_input(gm)
    fused: list[tuple[list[str], list[int]]] = []  # (sites, ranks) per fused group
    for shrinks in by_input.values():
        if len(shrinks) < 2:
            continue
        sites, ranks = [provenance(s)["site"] for s in shrinks], _ranks(gm, shrinks)
        _fuse(gm, shrinks, sites, ranks, ctx)
        fused.append((sites, ranks))
        result.sites += sites
    result.modified = bool(fused)
    result.notes = _fused_notes(fused) + _unfused_dropout_notes(by_input)
    return result


def may_fuse(spec) -> bool:
    """Whether any LoRA entry can share a shrink: one without dropout (each dropout is its own node)."""
    return any(entry.method == "lora" and entry.dropout == 0 for entry in spec.adapters)


def _shrinks_by_input(gm: GraphModule) -> dict[tuple, list[Node]]:
    """LoRA shrink nodes keyed by (input node, A dtype), in graph order."""
    groups: dict[tuple, list[Node]] = {}
    for node in gm.graph.nodes:
        if _is_shrink(gm, node):
            groups.setdefault((node.args[0], _param(gm, node.args[1]).dtype), []).append(node)
    return groups


def _is_shrink(gm: GraphModule, node: Node) -> bool:
    """linear(h, A) that insert_lora added, A being that site's own 2-D `A` parameter, read only there."""
    tag = provenance(node)
    if node.target != aten.linear.default or not tag or tag.get("pass") != "insert_lora":
        return False
    if len(node.args) != 2 or node.kwargs or not isinstance(node.args[0], Node):
        return False
    a = node.args[1]
    return (isinstance(a, Node) and a.op == "get_attr" and len(a.users) == 1
            and a.target == adapters.target(tag["site"], tag["slot"], "A") and _param(gm, a).dim() == 2)


def _fuse(gm: GraphModule, shrinks: list[Node], sites: list[str], ranks: list[int], ctx: PassContext) -> None:
    """One cat + linear + split before the first shrink; each shrink's users read its slice."""
    first = shrinks[0]
    weights = [s.args[1] for s in shrinks]
    for a in weights:  # get_attr has no inputs: moving it earlier keeps the graph valid
        first.prepend(a)
    tag = {"pass": PASS, "method": "lora", "site": _common_path(sites), "slot": None, "entry": None,
           "sites": sites}
    ins = Inserter(gm, first.prev, tag, meta_cache=ctx.meta_cache)
    ins.module_stack = _common_stack([s.meta.get("nn_module_stack") for s in shrinks])
    hidden = ins.call(packed_shrink.OP, first.args[0], weights)  # linear(h, cat(A_i)), saving the A's alone
    parts = ins.call(aten.split_with_sizes.default, hidden, ranks, -1)
    for index, shrink in enumerate(shrinks):
        part = ins.call(operator.getitem, parts, index)
        part.meta["peftc"]["site"] = provenance(shrink)["site"]
        shrink.replace_all_uses_with(part)
        gm.graph.erase_node(shrink)


def _fused_notes(fused: list[tuple[list[str], list[int]]]) -> list[str]:
    """One note per kind of group (same member names and ranks), its layers folded: `...{0..31}.self_attn`."""
    by_kind: dict[tuple, list[str]] = {}
    for sites, ranks in fused:
        parent = _common_path(sites)
        members = tuple(site[len(parent):].lstrip(".") for site in sites)
        by_kind.setdefault((members, tuple(ranks)), []).append(parent)
    notes = []
    for (members, ranks), parents in by_kind.items():
        where = ", ".join(label for label, _ in group_paths(parents))
        notes.append(f"fused LoRA shrinks into one matmul (r {'+'.join(map(str, ranks))}): "
                     f"{where}.{{{', '.join(members)}}}")
    return notes


def _unfused_dropout_notes(by_input: dict[tuple, list[Node]]) -> list[str]:
    """Name the sites left unfused because they read a shared input through their own dropout."""
    readers: dict[Node, int] = {}  # shared input -> how many shrinks read it, directly or via a dropout
    behind_dropout: dict[Node, list[str]] = {}
    for (h, _), shrinks in by_input.items():
        root = h.args[0] if _is_lora_dropout(h) else h
        readers[root] = readers.get(root, 0) + len(shrinks)
        if _is_lora_dropout(h):
            behind_dropout.setdefault(root, []).extend(provenance(s)["site"] for s in shrinks)
    unfused = [site for root, sites in behind_dropout.items() if readers[root] > 1 for site in sites]
    return [f"not fused (each applies its own LoRA dropout mask): {_label(unfused)}"] if unfused else []


def _is_lora_dropout(node: Node) -> bool:
    """A dropout insert_lora added for one branch (the model's own dropouts are shared inputs like any node)."""
    return (node.op == "call_function" and node.target in DROPOUT_OPS and isinstance(node.args[0], Node)
            and (provenance(node) or {}).get("pass") == "insert_lora")


def _label(sites: list[str]) -> str:
    return ", ".join(label for label, _ in group_paths(sites))


def _ranks(gm: GraphModule, shrinks: list[Node]) -> list[int]:
    return [_param(gm, s.args[1]).shape[0] for s in shrinks]


def _common_path(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for names in zip(*parts):
        if len(set(names)) != 1:
            break
        common.append(names[0])
    return ".".join(common)


def _common_stack(stacks: list) -> dict | None:
    """The module stack every shrink shares (the attention or MLP block that holds the sites)."""
    if any(s is None for s in stacks):
        return None
    common = {}
    for key, value in stacks[0].items():
        if not all(s.get(key) == value for s in stacks[1:]):
            break
        common[key] = value
    return common


def _param(gm: GraphModule, node: Node) -> torch.Tensor:
    return gm.get_parameter(node.target)

"""copy_params: train copies of selected base parameters; the model's own stay frozen and untouched.

This is HF PEFT's `modules_to_save` (a trainable copy of a whole module) and, with
`params: ["bias"]`, its `bias="all"|"lora_only"` — as a method, so the user's model is never
written. The spec's `trainable` patterns, by contrast, train the base parameters in place.
Each copy lives in the adapter tree at `<owner module>.<slot>.<leaf>`, e.g.
`classifier.copy.weight`, and the graph reads it where it read the base parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.fx import GraphModule, Node

from peftc.core.fields import optional_pattern_list, pattern_list
from peftc.core.targets import matches_any, select
from peftc.ir import adapters
from peftc.ir.graph_edit import Inserter
from peftc.ir.sites import module_path_of
from peftc.pipeline.runner import PassContext, PassResult


@dataclass(frozen=True)
class CopyConfig:
    """Trainable copies of every parameter of the `targets` modules (and their submodules),
    optionally only those whose leaf name matches `params` (e.g. ["bias"])."""

    method = "copy"
    targets: tuple = field(metadata={"check": pattern_list})
    params: tuple = field(default=(), metadata={"check": optional_pattern_list})
    exclude: tuple = field(default=(), metadata={"check": optional_pattern_list})


class ParamCopies(nn.Module):
    """The copies of one module's own parameters, under their own leaf names."""


def owner_of(name: str) -> tuple[str, str]:
    owner, _, leaf = name.rpartition(".")
    return owner, leaf


def module_paths(param_names) -> list[str]:
    """Every module path that holds a parameter, itself or below it ('' is the root)."""
    paths: dict[str, None] = {"": None}
    for name in param_names:
        parts = name.split(".")[:-1]
        for i in range(1, len(parts) + 1):
            paths[".".join(parts[:i])] = None
    return list(paths)


def copied_names(config: CopyConfig, param_names, field_path: str) -> list[str]:
    """The parameter names (FQNs) a copy entry selects, in the given order.

    A parameter is selected when a target matches its module or a module above it, no `exclude`
    pattern matches its module, and (if `params` is given) a `params` pattern matches its leaf name.
    """
    param_names = list(param_names)
    chosen = select(config.targets, module_paths(param_names), f"{field_path}.targets", what="module path")

    def wanted(name: str) -> bool:
        owner, leaf = owner_of(name)
        return (any(_is_under(owner, m) for m in chosen) and not matches_any(config.exclude, owner)
                and (not config.params or matches_any(config.params, leaf)))

    return [name for name in param_names if wanted(name)]


def new_copies(spec, index: int, param_names) -> list[str]:
    """What entry `index` copies: its selection, less what an earlier copy entry already copied."""
    earlier = {name for i, entry in enumerate(spec.adapters[:index]) if entry.method == "copy"
               for name in copied_names(entry, param_names, f"adapters[{i}]")}
    return [n for n in copied_names(spec.adapters[index], param_names, f"adapters[{index}]") if n not in earlier]


def copy_params(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Read a trainable copy, in the adapter tree, wherever the graph read a selected base parameter."""
    config: CopyConfig = ctx.entry
    names = new_copies(ctx.spec, ctx.entry_index, ctx.base_params)
    result = PassResult(modified=False)
    if not names:
        result.notes.append(f"no parameter of {list(config.targets)} is named {list(config.params)}")
        return result
    copies = {name: _copy_of(ctx, name, result) for name in names}
    aliases: dict[int, list[str]] = {}
    for name, param in ctx.base_params.items():
        aliases.setdefault(id(param), []).append(name)
    for node in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        param = ctx.base_params.get(node.target)
        if param is None or not any(a in copies for a in aliases[id(param)]):
            continue
        result.modified |= _redirect(gm, node, aliases[id(param)], copies, ctx)
        if not node.users:
            gm.graph.erase_node(node)
    result.notes.append(f"copied {len(names)} parameters: " + ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
    return result


def _copy_of(ctx: PassContext, name: str, result: PassResult) -> str:
    """The adapter-tree target holding the copy of base parameter `name` (created on first use)."""
    owner, leaf = owner_of(name)
    base = ctx.base_params[name]
    module, _ = adapters.get_or_create(ctx.adapter_root, owner, ctx.slot, ParamCopies)
    if leaf not in module._parameters:
        module.register_parameter(leaf, nn.Parameter(base.detach().clone(), requires_grad=True))
        result.params_added[adapters.state_name(owner, ctx.slot, leaf)] = base.numel()
    return adapters.target(owner, ctx.slot, leaf)


def _redirect(gm: GraphModule, node: Node, names: list[str], copies: dict[str, str], ctx: PassContext) -> bool:
    """Point each user of `node` at the copy for the parameter name it reads through."""
    created: dict[str, Node] = {}
    changed = False
    for user in list(node.users):
        name = _name_used_by(user, names, copies)
        if name is None:
            continue
        if name not in created:
            owner, _ = owner_of(name)
            tag = {"pass": "copy_params", "method": "copy", "site": owner, "slot": ctx.slot,
                   "entry": ctx.entry_index}
            created[name] = Inserter(gm, node, tag).get_attr(copies[name])
        user.replace_input_with(node, created[name])
        changed = True
    return changed


def _name_used_by(user: Node, names: list[str], copies: dict[str, str]) -> str | None:
    """Which copied name a use reads: for tied weights, the one whose module the use runs in."""
    chosen = [n for n in names if n in copies]
    if len(names) == 1:
        return chosen[0]
    where = module_path_of(user)
    owning = [n for n in names if _is_under(where, owner_of(n)[0])]
    if owning:
        picked = [n for n in owning if n in copies]
        return picked[0] if picked else None
    return chosen[0] if len(chosen) == len(names) else None


def _is_under(path: str, owner: str) -> bool:
    return owner == "" or path == owner or path.startswith(owner + ".")


"""One module tree per compiled model, read by every graph it runs.

A compiled model runs one graph per call signature. Each graph is captured separately, and
torch.fx gives each its own copy of the module hierarchy (plain modules holding the same
parameter objects). If each graph kept its copy, anything that acts on modules — FSDP2's
`fully_shard(cm.model.layers[3])`, which replaces that module's parameters by shards and
gathers them in the module's forward hook, a layer's checkpointing flag, the programs a
layer holds — would reach one graph and not the others.

So the compiled model owns the tree: its children are the first graph's top-level modules
(`model`, `lm_head`, `peftc` ...), its `_parameters`/`_buffers` are that graph's root tensors,
and every later graph is attached to the same objects: its layers' programs are added to
the tree's layers and its top-level entries point at the tree's modules. `named_parameters()`
of a compiled model therefore reads like the original model's (`model.layers.0.mlp.up_proj.weight`,
adapters under `peftc.`). Modules torch.export adds for one graph (`_guards_fn`, private
names) stay that graph's own.

A graph whose tensors disagree with the tree (a pass made a different tensor under the same
name) is not attached; it keeps its own copy and still computes what it should.

The tree is also the one owner of the base weights: the model later graphs are captured from
(`compilation.source`) reads its parameters from the tree's modules (`share_parameters`), so when
FSDP2 replaces a tree module's parameters by shards nothing else keeps the full weights alive.
"""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from peftc.ir.layer_program import CompiledLayer


def is_private(name: str) -> bool:
    """Top-level modules torch.export made for one graph (its input guards), not the model's."""
    return name.startswith("_")


def adopt_tree(owner: nn.Module, gm: GraphModule) -> dict[str, int]:
    """Make `gm`'s tree `owner`'s own; returns the identity of each tensor in it, for attach_graph."""
    owner._modules.clear()
    owner._modules.update({name: child for name, child in gm._modules.items() if not is_private(name)})
    owner._parameters = gm._parameters
    owner._buffers = gm._buffers
    owner._non_persistent_buffers_set = gm._non_persistent_buffers_set
    return {name: id(t) for name, t in _tensors(gm)}


def attach_graph(owner: nn.Module, gm: GraphModule, origin: dict[str, int]) -> bool:
    """Point `gm` at `owner`'s tree (`origin`: adopt_tree's identities); False if they disagree."""
    if not _agrees(owner, gm, origin):
        return False
    for name, child in list(gm._modules.items()):
        if is_private(name):
            continue
        tree_child = owner._modules.get(name)
        if tree_child is None:
            owner._modules[name] = child
            origin.update({f"{name}.{n}": id(t) for n, t in _tensors(child)})
            continue
        _add_programs(tree_child, child)
        gm._modules[name] = tree_child
    for name, tensor in gm._parameters.items():
        owner._parameters.setdefault(name, tensor)
    for name, tensor in gm._buffers.items():
        owner._buffers.setdefault(name, tensor)
    gm._parameters, gm._buffers = owner._parameters, owner._buffers
    gm._non_persistent_buffers_set = owner._non_persistent_buffers_set
    return True


def share_parameters(source: nn.Module, owner: nn.Module) -> int:
    """Make each module of `source` (the model later graphs are captured from) read its parameters
    from the tree module at the same path: one dict, so the tree stays the one owner of each weight.

    FSDP2's `fully_shard` replaces a module's parameters by shards in the module's own parameter
    dict; a source holding its own references would keep every full weight alive on every rank.
    A module is linked only where the tree holds the very same tensors under the same names (a
    packed quantized weight, a tied copy the graph deduplicated stay the source's); the source's
    empty slots (`bias=None`) join the shared dict, where nothing lists them. Returns how many
    modules were linked.
    """
    linked = 0
    for path, module in source.named_modules(remove_duplicate=False):
        tree = _submodule(owner, path)
        if tree is None or tree._parameters is module._parameters or not module._parameters:
            continue
        held = {name: p for name, p in module._parameters.items() if p is not None}
        if any(tree._parameters.get(name) is not p for name, p in held.items()):
            continue
        for name, p in module._parameters.items():
            tree._parameters.setdefault(name, p)
        module._parameters = tree._parameters
        linked += 1
    return linked


def _submodule(owner: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return owner
    if is_private(path.split(".")[0]):
        return None
    try:
        return owner.get_submodule(path)
    except AttributeError:
        return None


def _agrees(owner: nn.Module, gm: GraphModule, origin: dict[str, int]) -> bool:
    # The tree's tensors now, not when it was adopted: FSDP2 replaces them by shards (and back) in place.
    current = {name: id(t) for name, t in _tensors(owner)}
    for name, tensor in _tensors(gm):
        if origin.get(name, id(tensor)) != id(tensor) and current.get(name) != id(tensor):
            return False
    for path, layer in _layers(gm):
        try:
            if not isinstance(owner.get_submodule(path), CompiledLayer):
                return False
        except AttributeError:
            return False
    return True


def _add_programs(tree: nn.Module, other: nn.Module) -> None:
    if tree is other:
        return
    for path, layer in _layers(other):
        tree.get_submodule(path).add_programs(layer.programs)


def _layers(module: nn.Module):
    return [(path, m) for path, m in module.named_modules() if isinstance(m, CompiledLayer)]


def _tensors(module: nn.Module):
    """(name, tensor) for every parameter and buffer outside private modules."""
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False)):
        if not is_private(name.split(".")[0]) or "." not in name:
            yield name, tensor

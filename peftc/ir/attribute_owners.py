"""Parameter reads of a graph run once per decoding step, made one attribute lookup deep.

FX generates `self.model.layers._0.self_attn.q_proj.weight` for a get_attr node: one
`nn.Module.__getattr__` per dot (a Python-level dict search each), ~6 per parameter. A decoding
step of a small model runs hundreds of parameter reads and little arithmetic, so the chains were
~7% of its time (benchmarks/RESULTS.md, "generate() per token"). `alias_attribute_owners` gives the
graph module each owning module once, as a plain instance attribute (`_owner_<i>`: not a submodule,
so the module tree, state_dict and named_modules are unchanged), and points each get_attr at
`_owner_<i>.<name>`: the parameter itself is still read from its module on every call, so a
parameter replaced there is the one read. Only for graphs whose module tree nothing reshapes
afterwards (generate()'s graphs: rebuilt on .to(), never sharded or structured).
"""

from __future__ import annotations

from torch.fx import GraphModule

ALIAS = "_owner_{}"


def alias_attribute_owners(gm: GraphModule) -> GraphModule:
    """`gm` with each get_attr read through an alias of the module that owns the attribute."""
    aliases: dict[str, str] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        owner, _, name = node.target.rpartition(".")
        if not owner:
            continue  # already one lookup deep
        if owner not in aliases:
            aliases[owner] = ALIAS.format(len(aliases))
            object.__setattr__(gm, aliases[owner], gm.get_submodule(owner))  # not registered: no tree change
        node.target = f"{aliases[owner]}.{name}"
    if aliases:
        gm.recompile()
    return gm

"""Invariants checked after every pass: base weights untouched, frozen params frozen,
every adapter tensor used on a path to the output."""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

from peftc.errors import InvariantError
from peftc.ir import adapters


def snapshot_base(base_params: dict[str, nn.Parameter]) -> dict[str, tuple[int, int]]:
    # _version counts in-place writes, so it catches any mutation of a base weight.
    return {name: (id(p), p._version) for name, p in base_params.items()}


def check_all(gm: GraphModule, ctx, snapshot: dict, pass_name: str, *, frozen: bool) -> None:
    check_base_untouched(ctx.base_params, snapshot, pass_name)
    check_adapters_reachable(gm, pass_name)
    if frozen:
        check_frozen(gm, ctx, pass_name)


def check_base_untouched(base_params: dict, snapshot: dict, pass_name: str) -> None:
    for name, param in base_params.items():
        if (id(param), param._version) != snapshot[name]:
            raise InvariantError(f"pass {pass_name!r} replaced or wrote base weight {name!r}")


def check_adapters_reachable(gm: GraphModule, pass_name: str) -> None:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    reachable = set()
    todo = [output]
    while todo:
        node = todo.pop()
        for inp in node.all_input_nodes:
            if inp not in reachable:
                reachable.add(inp)
                todo.append(inp)
    prefix = adapters.ROOT + "."
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith(prefix) and node not in reachable:
            raise InvariantError(f"pass {pass_name!r} left adapter tensor {node.target!r} off every path to the output")


def check_frozen(gm: GraphModule, ctx, pass_name: str) -> None:
    adapter_root = getattr(gm, adapters.ROOT, None)
    adapter_ids = {id(p) for p in adapter_root.parameters()} if adapter_root is not None else set()
    for name, param in gm.named_parameters():
        if param.requires_grad and id(param) not in adapter_ids and name not in ctx.trainable:
            raise InvariantError(f"after pass {pass_name!r}, frozen base parameter {name!r} requires grad")

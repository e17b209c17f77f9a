"""freeze_params: only adapter parameters and the spec's `trainable` base parameters require grad."""

from __future__ import annotations

from torch.fx import GraphModule

from peftc.ir import adapters
from peftc.pipeline.runner import PassContext, PassResult
from peftc.core.targets import select


def freeze_params(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Set requires_grad: True for adapter parameters and `trainable` matches, False elsewhere."""
    names = list(ctx.base_params)
    chosen = select(ctx.spec.trainable, names, "trainable", what="parameter name") if ctx.spec.trainable else []
    unfrozen_ids = {id(ctx.base_params[name]) for name in chosen}
    # Tied weights have several names; any of them unfreezes all.
    ctx.trainable = {name for name, p in ctx.base_params.items() if id(p) in unfrozen_ids}
    result = PassResult(modified=False)
    for name, param in ctx.base_params.items():
        wanted = id(param) in unfrozen_ids
        if param.requires_grad != wanted:
            param.requires_grad_(wanted)
            result.modified = True
        if wanted:
            result.sites.append(name)
    root = getattr(gm, adapters.ROOT)
    for param in root.parameters():
        if not param.requires_grad:
            param.requires_grad_(True)
            result.modified = True
    ctx.frozen = True
    return result

"""freeze_params: only adapter parameters and the spec's `trainable` base parameters require grad."""

from __future__ import annotations

from torch.fx import GraphModule

from peftc.ir import adapters
from peftc.pipeline.runner import PassContext, PassResult


def freeze_params(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Set requires_grad: True for adapter parameters and `trainable` matches, False elsewhere."""
    result = PassResult(modified=False)
    for name, param in ctx.base_params.items():
        wanted = name in ctx.trainable
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
    return result

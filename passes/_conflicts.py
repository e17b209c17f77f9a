"""One weight, one rewrite: two spec entries whose merges rewrite the same weight are refused.

Reparameterizations (lora, dora, loha, lokr, vera) and the other folding methods (ia3, mask)
each define the weight a site computes with; two of them on one weight have no single
meaning once merged (DoRA renormalizes whatever it is given), so the spec must choose.
"""

from __future__ import annotations

from torch.fx import GraphModule

from peftc.errors import SpecError
from peftc.ir.graph_edit import provenance
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext


def check_one_rewrite_per_weight(gm: GraphModule, ctx: PassContext, sites: list[Site]) -> None:
    """SpecError naming both entries if an earlier folding entry already rewrote one of `sites`' weights."""
    param_of = {s.path: s.param for s in ctx.sites}
    mine = {s.param: s.path for s in sites}
    for node in gm.graph.nodes:
        tag = provenance(node)
        if not tag or tag.get("entry") in (None, ctx.entry_index) or tag.get("site") not in param_of:
            continue
        method = ctx.methods.get(tag.get("method"))
        param = param_of[tag["site"]]
        if method is None or method.fold is None or param not in mine:
            continue
        raise SpecError(
            f"adapters[{tag['entry']}] ({tag['method']!r}) and adapters[{ctx.entry_index}] "
            f"({ctx.entry.method!r}) both reparameterize the weight {param!r} (site {mine[param]!r}); "
            "a weight takes one reparameterization: narrow one entry's 'targets' or add the site to its 'exclude'")

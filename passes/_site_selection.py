"""Which sites a spec entry's `targets` and `target_parameters` (minus `exclude`) select, with errors
that name the entry."""

from __future__ import annotations

from peftc.core.targets import matches_any, select
from peftc.errors import SpecError
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext


def select_sites(ctx: PassContext, config, kinds: tuple[str, ...]) -> list[Site]:
    """Sites of the given kinds whose path matches the entry's targets; SpecError if none do."""
    field = f"adapters[{ctx.entry_index}].targets"
    all_paths = list(dict.fromkeys(site.path for site in ctx.sites))
    chosen = set(select(config.targets, all_paths, field)) if config.targets else set()
    chosen |= _with_attention_out_proj(chosen, ctx.sites)
    chosen |= _by_parameter(ctx, getattr(config, "target_parameters", ()))
    excluded = getattr(config, "exclude", ())
    chosen = {p for p in chosen if not matches_any(excluded, p)}
    sites = [s for s in ctx.sites if s.path in chosen]
    usable = [s for s in sites if s.kind in kinds]
    if not usable:
        found = sorted({s.kind for s in sites}) or ["nothing after exclude"]
        raise SpecError(
            f"{field}: {list(config.targets)} selects {found} sites; method {config.method!r} "
            f"acts on {list(kinds)} sites")
    unsupported = sorted({s.path for s in sites if s.kind not in kinds})
    if unsupported:
        raise SpecError(
            f"{field}: method {config.method!r} cannot act on {unsupported[0]!r} "
            f"(a {next(s.kind for s in sites if s.path == unsupported[0])} site); it supports {list(kinds)}. "
            "Narrow the pattern or add it to 'exclude'")
    return usable


def _by_parameter(ctx: PassContext, patterns: tuple) -> set[str]:
    """Paths of the sites whose parameter FQN a `target_parameters` pattern matches."""
    if not patterns:
        return set()
    field = f"adapters[{ctx.entry_index}].target_parameters"
    params = list(dict.fromkeys(site.param for site in ctx.sites))
    chosen = set(select(patterns, params, field, what="parameter a site reads"))
    return {site.path for site in ctx.sites if site.param in chosen}


def _with_attention_out_proj(chosen: set[str], sites: list[Site]) -> set[str]:
    """nn.MultiheadAttention is adapted as a whole, as PEFT does: selecting its in-projection (the
    site at the attention module's path) selects its out_proj too."""
    attention = {s.module_path for s in sites if s.path in chosen and s.param.endswith(".in_proj_weight")}
    return {s.path for s in sites if s.module_path in attention and s.param == f"{s.module_path}.out_proj.weight"}

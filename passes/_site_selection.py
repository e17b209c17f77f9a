"""Which sites a spec entry's `targets` (minus `exclude`) select, with errors that name the entry."""

from __future__ import annotations

from peftc.core.targets import matches_any, select
from peftc.errors import SpecError
from peftc.ir.sites import Site
from peftc.pipeline.runner import PassContext


def select_sites(ctx: PassContext, config, kinds: tuple[str, ...]) -> list[Site]:
    """Sites of the given kinds whose path matches the entry's targets; SpecError if none do."""
    field = f"adapters[{ctx.entry_index}].targets"
    all_paths = list(dict.fromkeys(site.path for site in ctx.sites))
    chosen = set(select(config.targets, all_paths, field))
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

"""EVA's rank redistribution (Paulik et al., 2024; PEFT's eva_config.rho), decided once the calibration
statistics are in and written into the spec, so checkpoints, reports and PEFT configs see the ranks.

Each site of an EVA entry offers its round(r·rho) leading principal directions, each worth the share
of the site's input variance it explains; the entry's budget, the sum of its sites' r, goes to the
directions worth most across all sites. A site keeps as many directions as it won: its rank (with
alpha scaled by rank / r, PEFT's adjust_scaling_factors, so the scale alpha / r is kept); a site that
won none is left out, as PEFT removes its LoRA layer. Sites that read the same input explain the same
variance; ties go to the site that comes first, which is the one PEFT gives the larger rank.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from peftc.ir.calibration import SiteInputs
from peftc.spec.parse import Spec


def with_eva_ranks(spec: Spec, inputs: SiteInputs) -> Spec:
    """`spec` with each EVA entry whose eva_rho is not 1 resolved into rank_pattern / alpha_pattern / exclude."""
    adapters = list(spec.adapters)
    for index, entry in enumerate(spec.adapters):
        if getattr(entry, "init", None) == "eva" and entry.eva_rho != 1.0:
            adapters[index] = _resolved(entry, eva_ranks(entry, inputs, inputs.entry_paths[index]))
    return dataclasses.replace(spec, adapters=tuple(adapters))


def eva_ranks(entry, inputs: SiteInputs, paths: list[str]) -> dict[str, int]:
    """Site path -> its EVA rank, the budget sum(r) spread over the directions explaining the most variance."""
    offers, budget = [], 0
    for order, path in enumerate(paths):
        r = entry.r_at(path)
        budget += r
        ratios = inputs.explained_variance_ratio(path, round(r * entry.eva_rho))
        offers += [(-float(ratio), order, path) for ratio in ratios]
    won = Counter(path for _, _, path in sorted(offers)[:budget])
    return {path: won.get(path, 0) for path in paths}


def _resolved(entry, ranks: dict[str, int]):
    changed = {path: rank for path, rank in ranks.items() if rank and rank != entry.r_at(path)}
    rank_pattern = {**changed, **entry.rank_pattern}
    alpha_pattern = {**{path: entry.alpha_at(path) * rank / entry.r_at(path) for path, rank in changed.items()},
                     **entry.alpha_pattern}
    exclude = tuple(entry.exclude) + tuple(path for path, rank in ranks.items() if not rank)
    # the ranks are now explicit: eva_rho 1 keeps a recompile of this spec from spreading them again
    return dataclasses.replace(entry, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, exclude=exclude,
                               eva_rho=1.0)

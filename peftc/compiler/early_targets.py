"""A spec's target patterns checked against the model's own names, before anything is captured.

A site's path (peftc.ir.sites) is the path of the module its op ran in, or that path and a
parameter's leaf name, or a parameter's name less ".weight": a pattern that matches none of
those names of the model cannot match a site. Such a typo fails here, with the error the passes
would raise after the capture (torch.export takes seconds), naming the nearest paths that can be
sites (those of the model's weights: the parameters with two or more dimensions). What only the
graph tells — a pattern naming modules that run no site op (norms), a site of a kind the method
cannot act on — the passes still check on the graph's sites.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from peftc.core.targets import matches, nearest_hint, select
from peftc.errors import SpecError
from peftc.passes.copy_params import CopyConfig, copied_names
from peftc.spec.parse import Spec


@dataclass(frozen=True)
class ModelNames:
    params: list[str]  # every parameter name, tied ones under each of their names
    reachable: list[str]  # every name a site path can be (module paths, parameter names and their variants)
    site_like: list[str]  # the paths the model's weights would have as sites: what an error suggests
    weights: list[str]  # the parameters with two or more dimensions: what a site can read

    @classmethod
    def of(cls, model: nn.Module) -> "ModelNames":
        named = list(model.named_parameters(remove_duplicate=False))
        modules = [name for name, _ in model.named_modules(remove_duplicate=False)]
        leaves = {name.rpartition(".")[2] for name, _ in named}
        stripped = [name.removesuffix(".weight") for name, _ in named]
        with_leaves = [f"{m}.{leaf}".strip(".") for m in modules for leaf in leaves]  # a path made unique by its leaf
        weights = [name for name, p in named if p.dim() >= 2]
        return cls(params=[name for name, _ in named],
                   reachable=list(dict.fromkeys(modules + stripped + [n for n, _ in named] + with_leaves)),
                   site_like=list(dict.fromkeys(_site_path(name) for name in weights)), weights=weights)


def check_targets(model: nn.Module, spec: Spec) -> None:
    """The SpecError a pattern of `spec` that names nothing in `model` gets from the passes, raised now."""
    names = ModelNames.of(model)
    for i, entry in enumerate(spec.adapters):
        if isinstance(entry, CopyConfig):  # copies select module paths from parameter names: the same names here
            copied_names(entry, names.params, f"adapters[{i}]")
            continue
        _check(getattr(entry, "targets", ()), names.reachable, names.site_like, f"adapters[{i}].targets", "module path")
        _check(getattr(entry, "target_parameters", ()), names.params, names.weights,
               f"adapters[{i}].target_parameters", "parameter a site reads")
    if spec.quantize is not None:
        for part in ("targets", "exclude"):
            _check(getattr(spec.quantize, part, ()), names.reachable, names.site_like, f"quantize.{part}",
                   "module path")
    if spec.trainable:
        select(spec.trainable, names.params, "trainable", what="parameter name")


def _check(patterns: tuple, reachable: list[str], suggested: list[str], field: str, what: str) -> None:
    for i, pattern in enumerate(patterns):
        if not any(matches(pattern, path) for path in reachable):
            raise SpecError(f"{field}[{i}]: {pattern!r} matches no {what}; {nearest_hint(pattern, suggested)}")


def _site_path(param: str) -> str:
    """The path a weight's site gets when its op runs in the module holding it (peftc.ir.sites._site_path)."""
    owner, _, leaf = param.rpartition(".")
    if leaf in ("weight", "in_proj_weight"):
        return owner or leaf
    return param.removesuffix(".weight")

"""What each site's input looked like on calibration data: the statistics data-driven LoRA inits start from.

A calibration graph (passes/observe_site_inputs.py) calls `SiteInputs.record(path, x)` with the
input of every watched site, once per time the op runs. The input is read as rows of its last
dimension (x: [..., in] -> [N, in]); two statistics are kept per site, each an [in, in] sum:

- CorDA's covariance, as HF PEFT's `preprocess_corda` builds it from forward hooks: per call, the
  rows scaled by 1/|max x| (the largest entry, not the largest magnitude), then the mean over
  calls of x̂ᵀ x̂;
- EVA's principal directions (Paulik et al., 2024): the rows' mean and scatter, whose top
  eigenvectors are the principal components of all rows seen (PEFT fits them incrementally and
  stops once they settle; here they are exact, from every row). As PEFT's language-modeling
  default, a batch's `token_mask` (attention_mask, and labels != -100) keeps padding and
  ignored tokens out of EVA's rows when the site's input has one row per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Sums:
    calls: int = 0
    rows: int = 0
    corda: torch.Tensor | None = None  # sum over calls of x̂ᵀ x̂
    total: torch.Tensor | None = None  # sum of rows
    scatter: torch.Tensor | None = None  # sum of xᵀ x


class SiteInputs:
    """Input statistics per site path, filled by a calibration graph's recorder nodes."""

    def __init__(self):
        self._sums: dict[str, _Sums] = {}
        self.entry_paths: dict[int, list[str]] = {}  # spec.adapters index -> the site paths it targets
        self.token_mask: torch.Tensor | None = None  # [batch, seq] bool of the batch now running, or None

    @torch.no_grad()
    def record(self, path: str, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        sums = self._sums.setdefault(path, _Sums())
        scaled = rows / rows.max().abs()
        if not torch.isfinite(scaled).all():
            raise ValueError(f"calibration: the input of {path!r} holds inf or nan (or is all zero); "
                             "check the calibration batches")
        sums.corda = _add(sums.corda, scaled.T @ scaled)
        mask = self.token_mask
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            rows = rows[mask.reshape(-1)]
        sums.total = _add(sums.total, rows.sum(0))
        sums.scatter = _add(sums.scatter, rows.T @ rows)
        sums.calls += 1
        sums.rows += rows.shape[0]

    def seen(self, path: str) -> bool:
        return path in self._sums

    def covariance(self, path: str) -> torch.Tensor:
        """CorDA's C: the mean over calls of x̂ᵀ x̂ [in, in]."""
        sums = self._sums[path]
        return sums.corda / sums.calls

    def components(self, path: str, count: int) -> torch.Tensor:
        """EVA's A: the `count` leading principal directions of the rows [count, in], each with its
        largest entry positive (scikit-learn's sign rule, which PEFT's incremental PCA follows)."""
        values, vectors = self._principal(path)
        top = vectors[:, :count].T.float()
        signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        return top * signs

    def explained_variance_ratio(self, path: str, count: int) -> torch.Tensor:
        """The share of the rows' total variance along each of the `count` leading directions."""
        values, _ = self._principal(path)
        return (values[:count] / values.clamp_min(0).sum()).float()

    def _principal(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending) and eigenvectors (columns) of the rows' covariance, in float64."""
        sums = self._sums[path]
        mean = sums.total.double() / sums.rows
        covariance = sums.scatter.double() / sums.rows - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(covariance)
        order = values.argsort(descending=True)
        return values[order], vectors[:, order]

    def rows_seen(self, path: str) -> int:
        return self._sums[path].rows


def _add(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    return value.clone() if total is None else total + value

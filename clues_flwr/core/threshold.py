"""The global threshold τ, every rule of it in one place: the anchor rules, the histogram
rule (``fit``: the sites' pooled histograms fitted, the clean reference saying which part is
clean) with its fallback, and each site's keep decision.

The server holds public clean records: the validation set and the anchors (the
*reference*). Their scores place τ badly alone; the sites together hold thousands of
scores, of which each sends only counts over edges fixed from the reference. When the fit
cannot say where clean ends, the anchor-quantile τ on the whole reference is used and a
note says so: with validation and anchors, 60 clean scores rather than 10 set it.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from clues_flwr.core.fit import histogram_threshold

log = logging.getLogger(__name__)

RULES = ("anchor-mean", "anchor-quantile", "histogram")


def anchor_threshold(anchor_scores: Sequence[float] | torch.Tensor, rule: str, recall: float) -> float:
    """The global threshold τ from clean public records' scores (the anchors for the
    paper's rule, the whole reference for the quantile).

    ``anchor-mean`` (the paper): τ = mean anchor score. Anchors drawn like clean data sit
    around the middle of the clean scores, so about half of the clean data falls below.

    ``anchor-quantile``: τ = the k-th smallest of the n scores, k = ⌊(1 − r)(n + 1)⌋.
    If these records and clean samples are exchangeable, a clean sample ranks below the k-th
    with probability k/(n + 1), so it is kept with probability ≥ 1 − k/(n + 1) ≥ r.
    When k < 1 (n < 1/(1 − r) − 1: too few records for the asked recall) none gives
    that guarantee; τ falls back to the smallest score, which guarantees only
    1 − 1/(n + 1), and a warning says so.
    """
    s = torch.as_tensor(anchor_scores, dtype=torch.float64).flatten()
    if s.numel() == 0:
        raise ValueError("no anchor scores: the threshold needs at least one anchor")
    if rule == "anchor-mean":
        return float(s.mean())
    if rule != "anchor-quantile":
        raise ValueError(f"threshold rule must be anchor-mean or anchor-quantile here, got {rule!r}")
    if not 0 < recall < 1:
        raise ValueError(f"target recall must be in (0, 1), got {recall}")
    n = s.numel()
    k = math.floor((1 - recall) * (n + 1) + 1e-9)  # 1e-9: (1 - 0.9) * 20 is 1.99999...
    if k < 1:
        log.warning(
            "anchor-quantile: %d anchors cannot guarantee recall %.2f; using the smallest anchor "
            "score (guarantee %.3f)",
            n,
            recall,
            1 - 1 / (n + 1),
        )
        k = 1
    return float(s.sort().values[k - 1])


def histogram_edges(reference_scores: Sequence[float] | torch.Tensor, bins: int) -> list[float]:
    """Fixed bin edges around the clean reference (its range, widened by that range on each
    side), chosen by the server before any client score exists, so histograms reveal only
    counts."""
    s = torch.as_tensor(reference_scores, dtype=torch.float64).flatten()
    lo, hi = float(s.min()), float(s.max())
    spread = hi - lo or max(abs(hi), 1e-12)
    return torch.linspace(lo - spread, hi + spread, bins + 1).tolist()


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts over fixed ``edges`` plus an underflow and an overflow bin (len(edges) + 1
    counts): the server chooses the edges, so every client's histogram adds up. Non-finite
    values have no bin: they are counted apart (``non_finite``) and never kept."""
    counts = [0] * (len(edges) + 1)
    for v in values:
        if math.isfinite(v):
            counts[bisect.bisect_right(edges, v)] += 1
    return counts


def non_finite(values: Sequence[float] | torch.Tensor) -> int:
    return int((~torch.isfinite(torch.as_tensor(values, dtype=torch.float64))).sum())


def keep_top(scores: Sequence[float] | torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep mask of the ⌈ratio·N⌉ highest scores; among equal scores the earlier record wins,
    so a selection never depends on sort internals."""
    if not 0 < ratio <= 1:
        raise ValueError(f"keep ratio must be in (0, 1], got {ratio}")
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.isnan().any():
        raise ValueError("scores contain NaN: a NaN cannot be ranked")
    k = math.ceil(ratio * s.numel() - 1e-9)  # 1e-9: 0.07 * 100 is 7.000000000000001
    keep = torch.zeros(s.numel(), dtype=torch.bool)
    keep[torch.sort(s, descending=True, stable=True).indices[:k]] = True
    return keep


@dataclass(frozen=True)
class Standard:
    """One global standard, fixed from the clean public records before
    any site scores: the anchors' and the whole reference's (combined) scores, the histogram
    edges every site counts over, and τ when an anchor rule sets it (None: the histogram
    rule fits it to the sites' counts)."""

    anchor_scores: list[float]
    reference_scores: list[float]
    edges: list[float]
    threshold: float | None

    def row(self) -> dict:
        """As a report row and the run state keep it."""
        return {
            "threshold": self.threshold,
            "edges": self.edges,
            "anchor-scores": self.anchor_scores,
            "reference-scores": self.reference_scores,
        }

    @classmethod
    def from_row(cls, row: Mapping) -> "Standard":
        return cls(list(row["anchor-scores"]), list(row["reference-scores"]), list(row["edges"]), row["threshold"])


def _finite(scores, what: str) -> torch.Tensor:
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not torch.isfinite(s).all():
        raise ValueError(
            f"{int((~torch.isfinite(s)).sum())} of {s.numel()} {what} scores are not finite: "
            "no threshold can be set from them (check the public records and the scorer)"
        )
    return s


def standard(
    anchor_scores: Sequence[float] | torch.Tensor,
    reference_scores: Sequence[float] | torch.Tensor,
    rule: str,
    recall: float,
    bins: int,
) -> Standard:
    """What the server fixes from the public records' (combined) scores under ``rule``: edges
    only for the histogram rule (no site sends a histogram another rule does not need), from
    the reference; τ for an anchor rule (the paper's mean of the anchors, or the quantile of
    the reference); neither for ``keep-ratio`` (each site keeps its top share)."""
    anchors, reference = _finite(anchor_scores, "anchor"), _finite(reference_scores, "reference")
    tau = None
    if rule in ("anchor-mean", "anchor-quantile"):
        tau = anchor_threshold(anchors if rule == "anchor-mean" else reference, rule, recall)
    edges = histogram_edges(reference, bins) if rule == "histogram" else []
    return Standard(anchors.tolist(), reference.tolist(), edges, tau)


def global_threshold(
    held: Standard, histograms: Sequence[Sequence[int]], rule: str, fit: str, recall: float
) -> tuple[float | None, str, str]:
    """τ for every site held to ``held`` under ``rule``: the anchor rule's, the histogram fit to
    the sites' counts with the anchor-quantile τ as its fallback, or None for ``keep-ratio``;
    the rule actually applied; and a note when the fit fell back."""
    if rule == "keep-ratio" or held.threshold is not None:
        return held.threshold, rule, ""
    fallback = anchor_threshold(held.reference_scores, "anchor-quantile", recall)
    tau, note = histogram_threshold(histograms, held.edges, held.reference_scores, fit, fallback)
    if note:
        return tau, f"anchor-quantile (histogram fallback, target recall {recall})", f"{note} (anchor-quantile)"
    return tau, f"histogram ({fit})", ""


def keep(scores: Sequence[float] | torch.Tensor, threshold: float | None, keep_ratio: float) -> torch.Tensor:
    """A site's keep mask: its top ``keep_ratio`` when one is set, else S(z) ≥ τ; a
    non-finite score is never kept."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    finite = torch.isfinite(s)
    if keep_ratio:
        return keep_top(torch.where(finite, s, -torch.inf), keep_ratio) & finite
    return (s >= threshold) & finite

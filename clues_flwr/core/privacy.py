"""What a site lets leave it in the score phase: its own policy, checked on the node before
anything is sent, and optional ε-differential privacy for the counts it sends.

The server chooses the histogram edges and τ; a curious one could ask for 60,000 edges
(every record's score to four digits) or for τ after τ (the labels along the score axis).
A site answers only queries within ``SitePolicy``: at most ``max-histogram-bins`` bins over
strictly increasing finite edges, and one threshold per scoring (its scores are deleted once
applied).

With ``dp-epsilon`` > 0 every count a site sends goes through the two-sided geometric
mechanism (the discrete Laplace mechanism, Ghosh et al. 2009): count + G₁ − G₂ with G₁, G₂
i.i.d. geometric, P(noise = k) ∝ exp(−ε|k|), which is ε-DP for a query of L1 sensitivity 1
under adding or removing one record. Half the budget goes to the histogram (each record in
exactly one cell, the non-finite scores one more cell, so sensitivity 1), half to the kept
count. The total is the noisy histogram's sum and the noisy cells are clamped at 0: both are
post-processing and spend nothing. Confusion counts are not sent under DP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from clues_flwr.core.checks import require


@dataclass(frozen=True)
class SitePolicy:
    """A site's limits on what leaves it (its node config's keys, with safe defaults)."""

    max_histogram_bins: int = 100
    dp_epsilon: float = 0.0  # 0: exact counts

    def __post_init__(self):
        require("max-histogram-bins", self.max_histogram_bins, self.max_histogram_bins >= 2, "at least 2")
        require("dp-epsilon", self.dp_epsilon, self.dp_epsilon >= 0, "0 (off) or a positive ε")

    def edges_problem(self, edges: Sequence[float]) -> str | None:
        """Why this site refuses to count over ``edges`` (None when it may)."""
        if len(edges) - 1 > self.max_histogram_bins:
            most = self.max_histogram_bins
            return f"the server asked for {len(edges) - 1} bins; this site's max-histogram-bins is {most}"
        if not edges:
            return None  # no histogram asked for
        if len(edges) < 3 or not all(math.isfinite(e) for e in edges):
            return "histogram edges must be at least 3 finite numbers"
        if any(b <= a for a, b in zip(edges, edges[1:])):
            return "histogram edges must increase strictly"
        return None


def geometric_noise(size: int, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """``size`` draws of the two-sided geometric distribution, P(k) ∝ exp(−ε|k|)."""
    p = 1 - math.exp(-epsilon)  # success probability of each one-sided geometric
    u = torch.rand(2, size, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    draws = torch.floor(torch.log(u) / math.log1p(-p))  # failures before the first success
    return (draws[0] - draws[1]).long()


def noisy_counts(counts: Sequence[int], epsilon: float, generator: torch.Generator) -> list[int]:
    """``counts`` (one query of sensitivity 1) released with ε-DP, clamped at 0."""
    noise = geometric_noise(len(counts), epsilon, generator)
    return [max(int(c) + int(n), 0) for c, n in zip(counts, noise)]

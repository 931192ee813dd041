"""What a site lets leave it: its own policy, checked on the node before anything is
computed, and ε-differential privacy for the counts it sends.

The server chooses the histogram edges and τ; a curious one could ask for 60,000 edges
(every record's score to four digits), for τ after τ (the labels along the score axis), or
send one query many times and average the noise away. A site answers only within
``SitePolicy``, counted against everything it has released about the same records (the
site's ledger): at most ``max-histogram-bins`` bins over strictly increasing finite edges,
one score query and one threshold query per run, ``max-scorings`` runs in all, and under DP
at most ``dp-budget`` of ε in all.

With ``dp-epsilon`` > 0 every count derived from the records goes through the two-sided
geometric mechanism (the discrete Laplace mechanism, Ghosh et al. 2009): count + G₁ − G₂
with G₁, G₂ i.i.d. geometric, P(noise = k) ∝ exp(−ε|k|), which is ε-DP for a query of L1
sensitivity 1 under adding or removing one record. Half of a run's ε goes to the score
histogram (each record in exactly one cell, the non-finite scores one more, so sensitivity
1), half to the kept count. Totals are sums of noisy cells, clamped at 0: post-processing,
which spends nothing. The noise is drawn from numpy's PCG64 seeded with 128 bits from the
operating system, so that no seed search can reproduce it.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clues_flwr.core.checks import require


@dataclass(frozen=True)
class SitePolicy:
    """A site's limits on what leaves it (its node config's keys, with safe defaults)."""

    max_histogram_bins: int = 100
    max_scorings: int = 3  # runs in which a record set is scored; a resumed run is one more
    dp_epsilon: float = 0.0  # ε per run; 0: exact counts
    dp_budget: float = 3.0  # ε across every run on one record set
    min_heldout: int = 10  # fewer held-out records: no held-out loss is sent
    allow_labels: bool = False  # research runs: label counts and the oracle selection

    def __post_init__(self):
        require("max-histogram-bins", self.max_histogram_bins, self.max_histogram_bins >= 2, "at least 2")
        require("max-scorings", self.max_scorings, self.max_scorings >= 1, "at least 1")
        ok = self.dp_epsilon == 0 or self.dp_epsilon >= 1e-6  # a smaller ε drowns every count in noise
        require("dp-epsilon", self.dp_epsilon, ok, "0 (off) or an ε of at least 1e-6")
        require("dp-budget", self.dp_budget, self.dp_budget >= self.dp_epsilon, "at least dp-epsilon")
        require("min-heldout", self.min_heldout, self.min_heldout >= 1, "at least 1")

    @property
    def labels(self) -> bool:
        """Whether counts derived from quality labels may leave: allowed, and exact."""
        return self.allow_labels and not self.dp_epsilon

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


def unseen() -> np.random.Generator:
    """A generator no one outside can reproduce: 128 bits of seed from the operating system."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def geometric_noise(size: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of the two-sided geometric distribution, P(k) ∝ exp(−ε|k|)."""
    p = -math.expm1(-epsilon)  # success probability of each one-sided geometric; exact for tiny ε
    u = np.maximum(rng.random((2, size)), 1e-300)
    draws = np.floor(np.log(u) / math.log1p(-p))  # failures before the first success
    return (draws[0] - draws[1]).astype(np.int64)


def noisy_counts(counts: Sequence[int], epsilon: float, rng: np.random.Generator) -> list[int]:
    """``counts`` (one query of sensitivity 1) released with ε-DP, clamped at 0."""
    noise = geometric_noise(len(counts), epsilon, rng)
    return [max(int(c) + int(n), 0) for c, n in zip(counts, noise)]

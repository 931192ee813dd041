"""The global threshold τ, every rule of it in one place: the anchor rules, the histogram
rule (the sites' pooled histograms fitted, the clean reference saying which part is clean)
with its fallback, each site's keep decision, and the guards a user reads before tuning.

The server holds public clean records: the validation set and the anchors (the
*reference*). Their scores place τ badly alone; the sites together hold thousands of
scores. Each site sends only counts over bin edges the server fixed from the reference
before any site scored, the server sums them and fits the pooled distribution. Two fits:

- ``mixture``: a two-component Gaussian mixture fitted by EM to the binned counts, the clean
  component the one under which the reference is likelier; τ maximises the F1 the fitted
  mixture expects (keep s ≥ τ, positive = clean).
- ``valley``: the lowest point of the smoothed pooled histogram between the clean mode (the
  one the reference sits in) and the nearest mode below it; the mixture's τ when there is
  no mode below.

Both see only the histogram, so τ is resolved to about one bin. When the fitted mixture
cannot say where clean ends (its components overlap, Ashman's D < 2, as on a backbone that
has not read the sites' facts; or the second one is a sliver or lies above the clean one),
the anchor-quantile τ on the whole reference is used and a note says so: with validation
and anchors, 60 clean scores rather than 10 set it.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

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


FITS = ("mixture", "valley")


def pooled(histograms: Sequence[Sequence[int]]) -> np.ndarray:
    """The sites' counts summed bin by bin (every site's histogram has the same edges)."""
    widths = {len(h) for h in histograms}
    if len(widths) != 1:
        raise ValueError(f"site histograms over different bins: lengths {sorted(widths)}")
    return np.sum(np.asarray(histograms, dtype=np.float64), axis=0)


def _cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def _normal_cdf(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return _cdf((np.asarray(x) - mean) / std)


def _bin_moments(lo: np.ndarray, hi: np.ndarray, mean: float, std: float):
    """Probability of each bin [lo, hi) under N(mean, std²), and E[x], E[x²] given the bin
    (the truncated normal's moments; lo = -inf and hi = +inf for the open end bins)."""
    a, b = (lo - mean) / std, (hi - mean) / std
    mass = np.maximum(_cdf(b) - _cdf(a), 0.0)
    tiny = mass < 1e-12
    safe = np.where(tiny, 1.0, mass)
    af, bf = np.where(np.isfinite(a), a, 0.0), np.where(np.isfinite(b), b, 0.0)
    pa, pb = np.where(np.isfinite(a), _pdf(af), 0.0), np.where(np.isfinite(b), _pdf(bf), 0.0)
    shift = (pa - pb) / safe
    first = mean + std * shift
    var = std**2 * np.maximum(1 + (af * pa - bf * pb) / safe - shift**2, 0.0)
    # a bin far in a tail has mass ~0 under this component: its moments are the bin's edge
    edge = np.where(np.isfinite(lo), np.where(np.isfinite(hi), (lo + hi) / 2, lo), hi)
    first = np.where(tiny, edge, first)
    var = np.where(tiny, 0.0, var)
    return mass, first, var + first**2


class Mixture(NamedTuple):
    """A fitted two-component mixture: (weight, mean, std) of the clean component and of the
    other, and whether EM converged."""

    clean: tuple[float, float, float]
    polluted: tuple[float, float, float]
    converged: bool


EM_TOLERANCE = 1e-10  # relative change of the binned log-likelihood at which EM stops
EM_ITERATIONS = 5000  # the cap


def fit_mixture(counts: np.ndarray, edges: Sequence[float], reference: np.ndarray) -> Mixture:
    """EM for two Gaussians on binned counts, the open end bins treated as censored (exact
    EM for interval data), until the binned log-likelihood changes by less than
    ``EM_TOLERANCE`` (relative) or ``EM_ITERATIONS`` pass.

    Starts the clean component at the clean ``reference`` and the other at the whole
    distribution, so EM settles on the split the reference points to; the clean one is the
    component under which the reference is likelier."""
    e = np.asarray(edges, dtype=np.float64)
    lo, hi = np.concatenate([[-np.inf], e]), np.concatenate([e, [np.inf]])
    mid = np.clip((lo + hi) / 2, e[0], e[-1])
    total = counts.sum()
    floor = (e[1] - e[0]) / 4
    overall_mean = float((counts * mid).sum() / total)
    overall_std = max(float(np.sqrt((counts * (mid - overall_mean) ** 2).sum() / total)), floor)
    clean = (float(reference.mean()), max(float(reference.std(ddof=1 if reference.size > 1 else 0)), floor))
    params = [(0.5, *clean), (0.5, overall_mean, overall_std)]
    converged, previous = False, -math.inf
    for _ in range(EM_ITERATIONS):
        moments = [_bin_moments(lo, hi, m, s) for _, m, s in params]
        joint = np.stack([w * mass for (w, _, _), (mass, _, _) in zip(params, moments)])
        density = joint.sum(0)
        loglik = float((counts * np.log(np.maximum(density, 1e-300))).sum())
        if abs(loglik - previous) <= EM_TOLERANCE * abs(loglik):
            converged = True
            break
        previous = loglik
        resp = joint / np.maximum(density, 1e-300)
        new = []
        for r, (_, first, second) in zip(resp, moments):
            weight = r * counts
            mass = float(weight.sum())
            if mass < 1e-9:  # a component emptied: EM cannot go on, and the fit is no mixture
                return Mixture(params[0], params[1], False)
            mean = float((weight * first).sum() / mass)
            var = float((weight * (second - 2 * mean * first + mean**2)).sum() / mass)
            new.append((mass / total, mean, max(math.sqrt(max(var, 0.0)), floor)))
        params = new
    likelihood = [sum(-0.5 * ((reference - m) / s) ** 2 - math.log(s)) for _, m, s in params]
    first = int(np.argmax(likelihood))
    return Mixture(params[first], params[1 - first], converged)


def expected_f1(candidates: np.ndarray, clean, polluted) -> np.ndarray:
    """F1 of keeping s ≥ τ at each candidate τ, as the fitted mixture expects it."""
    wc, mc, sc = clean
    wp, mp, sp = polluted
    tp = wc * (1 - _normal_cdf(candidates, mc, sc))
    fn = wc - tp
    fp = wp * (1 - _normal_cdf(candidates, mp, sp))
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300)


def mixture_threshold(edges: Sequence[float], fit: Mixture) -> float:
    """The τ (on a grid of 20 points a bin) at which the fitted mixture expects the best F1."""
    e = np.asarray(edges, dtype=np.float64)
    candidates = np.linspace(e[0], e[-1], 20 * (len(e) - 1) + 1)
    return float(candidates[int(np.argmax(expected_f1(candidates, fit.clean, fit.polluted)))])


def smooth(counts: np.ndarray, bins: float = 1.0) -> np.ndarray:
    """Counts convolved with a Gaussian of ``bins`` bins' std (reflecting at the ends), so
    one-bin dips in a small sample are not taken for valleys."""
    radius = max(1, int(3 * bins))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / bins) ** 2)
    padded = np.pad(counts, radius, mode="reflect")
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


def valley_threshold(counts: np.ndarray, edges: Sequence[float], reference: np.ndarray, mixture: Mixture) -> float:
    e = np.asarray(edges, dtype=np.float64)
    x = np.concatenate([[e[0] - (e[1] - e[0]) / 2], (e[:-1] + e[1:]) / 2, [e[-1] + (e[1] - e[0]) / 2]])
    density = smooth(counts, bins=max(1.0, len(counts) / 40))
    clean_bin = int(np.argmin(np.abs(x - np.median(reference))))
    # climb from the reference's bin to the clean mode, then walk down to the valley below it
    top = clean_bin
    while top > 0 and density[top - 1] >= density[top]:
        top -= 1
    while top + 1 < len(density) and density[top + 1] > density[top]:
        top += 1
    low = top
    while low > 0 and density[low - 1] <= density[low]:
        low -= 1
    if low == 0 or density[:low].max() <= density[low] * 1.05:
        return mixture_threshold(edges, mixture)  # no mode below the clean one
    return float(x[low] - (x[1] - x[0]) / 2)


def separation(clean, polluted) -> float:
    """Ashman's D of two fitted components: below 2 a mixture of two Gaussians is not
    clearly bimodal, so the histogram cannot say where clean ends."""
    (_, m1, s1), (_, m2, s2) = clean, polluted
    return math.sqrt(2) * abs(m1 - m2) / math.sqrt(s1**2 + s2**2)


def unusable(fit: Mixture, min_weight: float = 0.05) -> str:
    """Why a fitted mixture cannot place τ ('' when it can): EM did not converge or gave
    non-finite parameters, its components overlap (Ashman's D < 2, not bimodal), the second
    one is a sliver (a pile-up of identical scores, not a kind of pollution), or it lies
    above the clean one (keeping s ≥ τ cannot drop it)."""
    clean, polluted = fit.clean, fit.polluted
    if not all(math.isfinite(x) for x in (*clean, *polluted)):
        return "the mixture fit gave non-finite parameters"
    d = separation(clean, polluted)
    if d < 2:
        return f"the pooled histogram is not bimodal (Ashman's D {d:.2f} < 2)"
    if polluted[0] < min_weight:
        return f"the second component holds only {polluted[0]:.1%} of the records"
    if polluted[1] >= clean[1]:
        return "the second component scores above the clean one"
    if not fit.converged:
        return f"the mixture fit did not converge in {EM_ITERATIONS} EM iterations"
    return ""


def histogram_threshold(
    histograms: Sequence[Sequence[int]],
    edges: Sequence[float],
    reference_scores: Sequence[float],
    fit: str,
    fallback: float | None,
) -> tuple[float, str]:
    """The global τ from the sites' histograms over ``edges`` (counts include the under- and
    overflow bins) and the clean reference's scores, by ``fit``; and a note, empty unless τ
    is the ``fallback`` (an anchor rule's τ) because the fit cannot place it."""
    if fit not in FITS:
        raise ValueError(f"histogram-fit must be one of {FITS}, got {fit!r}")
    if len(edges) < 3:
        raise ValueError(f"the histogram rule needs at least 2 bins, got {len(edges) - 1}")
    counts = pooled(histograms)
    if len(counts) != len(edges) + 1:
        raise ValueError(f"{len(counts)} counts over {len(edges)} edges: expected len(edges) + 1")
    reference = np.asarray(reference_scores, dtype=np.float64)
    if counts.sum() < 2 or reference.size < 1:
        raise ValueError("the histogram rule needs at least 2 scored records and 1 reference score")
    mixture = fit_mixture(counts, edges, reference)
    problem = unusable(mixture)
    if fallback is not None and problem:
        return fallback, f"{problem}: the anchor rule's τ"
    if fit == "valley":
        return valley_threshold(counts, edges, reference, mixture), ""
    return mixture_threshold(edges, mixture), ""


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
    """The public side of one global standard, fixed from the clean public records before
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
            "histogram-edges": self.edges,
            "anchor-scores": self.anchor_scores,
            "reference-scores": self.reference_scores,
        }

    @classmethod
    def from_row(cls, row: Mapping) -> "Standard":
        return cls(
            list(row["anchor-scores"]), list(row["reference-scores"]), list(row["histogram-edges"]), row["threshold"]
        )


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
    public: Standard, histograms: Sequence[Sequence[int]], rule: str, fit: str, recall: float
) -> tuple[float | None, str, str]:
    """τ for every site of ``public`` under ``rule``: the anchor rule's, the histogram fit to
    the sites' counts with the anchor-quantile τ as its fallback, or None for ``keep-ratio``;
    the rule actually applied; and a note when the fit fell back."""
    if rule == "keep-ratio" or public.threshold is not None:
        return public.threshold, rule, ""
    fallback = anchor_threshold(public.reference_scores, "anchor-quantile", recall)
    tau, note = histogram_threshold(histograms, public.edges, public.reference_scores, fit, fallback)
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


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed in log space (n may be thousands)."""
    if p <= 0 or p >= 1:
        return 1.0 if p <= 0 or k >= n else 0.0
    i = np.arange(k + 1)
    log_pmf = (
        math.lgamma(n + 1)
        - np.vectorize(math.lgamma)(i + 1)
        - np.vectorize(math.lgamma)(n - i + 1)
        + i * math.log(p)
        + (n - i) * math.log1p(-p)
    )
    return float(min(np.exp(log_pmf).sum(), 1.0))


def pass_rate_bounds(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Clopper-Pearson one-sided bounds of a pass rate seen as ``k`` of ``n``: each holds the
    true rate with probability ≥ 1 − ``alpha``."""

    def crossing(rising, target: float) -> float:  # the p in [0, 1] where the increasing rising(p) reaches target
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if rising(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k <= 0 else crossing(lambda p: 1 - _binomial_cdf(k - 1, n, p), alpha)  # P(X ≥ k) = α
    upper = 1.0 if k >= n else crossing(lambda p: 1 - _binomial_cdf(k, n, p), 1 - alpha)  # P(X ≤ k) = α
    return lower, upper


GUARD_ALPHA = 0.01  # false-alarm rate of the pass-rate guard when every record is clean


def guards(clients: Mapping[int, Mapping], keep_ratio: float) -> list[str]:
    """What a user should look at before tuning: a site that kept nothing or everything, and
    records passing τ more often than clean records can.

    The reference records are clean, so their pass count bounds the rate p at which clean
    records pass τ. Polluted records a score sees pass less often, so the sites' kept share
    is at most p; when even its lower bound exceeds the reference's upper bound (one-sided
    Clopper-Pearson, ``GUARD_ALPHA`` / 2 each), some pollution ranks above clean data. With
    a small reference the bound is wide: when nearly every reference record passes, this
    test cannot fire, and it says nothing rather than something false."""
    out = []
    for node, row in clients.items():
        if row["total"] and row["kept"] in (0, row["total"]):
            what = "none" if row["kept"] == 0 else "all"
            out.append(f"{row.get('site') or f'site {node}'} kept {what} of its {row['total']} records")
    total = sum(r["total"] for r in clients.values())
    if keep_ratio or not total:
        return out
    kept = sum(r["kept"] for r in clients.values())
    clean = [a >= r["threshold"] for r in clients.values() for a in r["reference-scores"]]
    kept_low, _ = pass_rate_bounds(kept, total, GUARD_ALPHA / 2)
    _, clean_high = pass_rate_bounds(sum(clean), len(clean), GUARD_ALPHA / 2)
    if kept_low > clean_high:
        out.append(
            f"{kept / total:.0%} of the sites' records pass τ, more than clean records can "
            f"({sum(clean)} of {len(clean)} clean reference records pass: at most {clean_high:.0%}): "
            "the score ranks some records above clean data (pollution it cannot see?)"
        )
    return out

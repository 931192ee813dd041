"""One global threshold calibrated on every site's score histogram (``threshold-rule =
"histogram"``).

Ten anchor scores place τ badly; the sites together hold thousands of scores. Each site
sends only counts over bin edges the server fixed from the anchors before any site scored,
the server sums them (each site weighted by its record count) and fits the pooled
distribution; the anchors only say which part of it is clean. Two fits:

- ``mixture``: a two-component Gaussian mixture fitted by EM to the binned counts, the clean
  component the one under which the anchors are likelier; τ maximises the F1 the fitted
  mixture expects (keep s ≥ τ, positive = clean).
- ``valley``: the lowest point of the smoothed pooled histogram between the clean mode (the
  one the anchors sit in) and the nearest mode below it; the mixture's τ when there is no
  mode below.

Both see only the histogram, so τ is resolved to about one bin. When the fitted mixture
cannot say where clean ends (its components overlap, Ashman's D < 2; or the second one is a
sliver or lies above the clean one), the caller's fallback τ (an anchor rule's) is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

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


def fit_mixture(counts: np.ndarray, edges: Sequence[float], anchors: np.ndarray, iterations: int = 300):
    """EM for two Gaussians on binned counts, the open end bins treated as censored (exact
    EM for interval data); returns ((weight, mean, std) clean, the same polluted).

    Starts the clean component at the anchors and the other at the whole distribution, so
    EM settles on the split the anchors point to; the clean one is the component under which
    the anchors are likelier."""
    e = np.asarray(edges, dtype=np.float64)
    lo, hi = np.concatenate([[-np.inf], e]), np.concatenate([e, [np.inf]])
    mid = np.clip((lo + hi) / 2, e[0], e[-1])
    total = counts.sum()
    floor = (e[1] - e[0]) / 4
    overall_mean = float((counts * mid).sum() / total)
    overall_std = max(float(np.sqrt((counts * (mid - overall_mean) ** 2).sum() / total)), floor)
    clean = (float(anchors.mean()), max(float(anchors.std(ddof=1 if anchors.size > 1 else 0)), floor))
    params = [(0.5, *clean), (0.5, overall_mean, overall_std)]
    for _ in range(iterations):
        moments = [_bin_moments(lo, hi, m, s) for _, m, s in params]
        joint = np.stack([w * mass for (w, _, _), (mass, _, _) in zip(params, moments)])
        resp = joint / np.maximum(joint.sum(0), 1e-300)
        new = []
        for r, (_, first, second) in zip(resp, moments):
            weight = r * counts
            mass = float(weight.sum())
            if mass < 1e-9:
                return params[0], params[1]
            mean = float((weight * first).sum() / mass)
            var = float((weight * (second - 2 * mean * first + mean**2)).sum() / mass)
            new.append((mass / total, mean, max(math.sqrt(max(var, 0.0)), floor)))
        done = all(np.allclose(a, b, rtol=1e-8, atol=1e-12) for a, b in zip(new, params))
        params = new
        if done:
            break
    likelihood = [sum(-0.5 * ((anchors - m) / s) ** 2 - math.log(s)) for _, m, s in params]
    first = int(np.argmax(likelihood))
    return params[first], params[1 - first]


def expected_f1(candidates: np.ndarray, clean, polluted) -> np.ndarray:
    """F1 of keeping s ≥ τ at each candidate τ, as the fitted mixture expects it."""
    wc, mc, sc = clean
    wp, mp, sp = polluted
    tp = wc * (1 - _normal_cdf(candidates, mc, sc))
    fn = wc - tp
    fp = wp * (1 - _normal_cdf(candidates, mp, sp))
    return 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300)


def mixture_threshold(counts: np.ndarray, edges: Sequence[float], anchors: np.ndarray) -> float:
    e = np.asarray(edges, dtype=np.float64)
    clean, polluted = fit_mixture(counts, edges, anchors)
    candidates = np.linspace(e[0], e[-1], 20 * (len(e) - 1) + 1)
    return float(candidates[int(np.argmax(expected_f1(candidates, clean, polluted)))])


def smooth(counts: np.ndarray, bins: float = 1.0) -> np.ndarray:
    """Counts convolved with a Gaussian of ``bins`` bins' std (reflecting at the ends), so
    one-bin dips in a small sample are not taken for valleys."""
    radius = max(1, int(3 * bins))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / bins) ** 2)
    padded = np.pad(counts, radius, mode="reflect")
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


def valley_threshold(counts: np.ndarray, edges: Sequence[float], anchors: np.ndarray) -> float:
    e = np.asarray(edges, dtype=np.float64)
    x = np.concatenate([[e[0] - (e[1] - e[0]) / 2], (e[:-1] + e[1:]) / 2, [e[-1] + (e[1] - e[0]) / 2]])
    density = smooth(counts, bins=max(1.0, len(counts) / 40))
    clean_bin = int(np.argmin(np.abs(x - np.median(anchors))))
    # climb from the anchors' bin to the clean mode, then walk down to the valley below it
    top = clean_bin
    while top > 0 and density[top - 1] >= density[top]:
        top -= 1
    while top + 1 < len(density) and density[top + 1] > density[top]:
        top += 1
    low = top
    while low > 0 and density[low - 1] <= density[low]:
        low -= 1
    if low == 0 or density[:low].max() <= density[low] * 1.05:
        return mixture_threshold(counts, edges, anchors)  # no mode below the clean one
    return float(x[low] - (x[1] - x[0]) / 2)


def separation(clean, polluted) -> float:
    """Ashman's D of two fitted components: below 2 a mixture of two Gaussians is not
    clearly bimodal, so the histogram cannot say where clean ends."""
    (_, m1, s1), (_, m2, s2) = clean, polluted
    return math.sqrt(2) * abs(m1 - m2) / math.sqrt(s1**2 + s2**2)


def unusable(clean, polluted, min_weight: float = 0.05) -> str:
    """Why a fitted mixture cannot place τ ('' when it can): its components overlap
    (Ashman's D < 2, not bimodal), the second one is a sliver (a pile-up of identical
    scores, not a kind of pollution), or it lies above the clean one (keeping s ≥ τ cannot
    drop it)."""
    d = separation(clean, polluted)
    if d < 2:
        return f"the pooled histogram is not bimodal (Ashman's D {d:.2f} < 2)"
    if polluted[0] < min_weight:
        return f"the second component holds only {polluted[0]:.1%} of the records"
    if polluted[1] >= clean[1]:
        return "the second component scores above the clean one"
    return ""


def histogram_threshold(
    histograms: Sequence[Sequence[int]],
    edges: Sequence[float],
    anchor_scores: Sequence[float],
    fit: str = "mixture",
    fallback: float | None = None,
) -> tuple[float, str]:
    """The global τ from the sites' histograms over ``edges`` (counts include the under- and
    overflow bins) and the anchors' scores, by ``fit``; and a note, empty unless τ is the
    ``fallback`` (an anchor rule's τ) because the fitted components are not separated."""
    if fit not in FITS:
        raise ValueError(f"histogram-fit must be one of {FITS}, got {fit!r}")
    if len(edges) < 3:
        raise ValueError(f"the histogram rule needs at least 2 bins, got {len(edges) - 1}")
    counts = pooled(histograms)
    if len(counts) != len(edges) + 1:
        raise ValueError(f"{len(counts)} counts over {len(edges)} edges: expected len(edges) + 1")
    anchors = np.asarray(anchor_scores, dtype=np.float64)
    if counts.sum() < 2 or anchors.size < 1:
        raise ValueError("the histogram rule needs at least 2 scored records and 1 anchor")
    clean, polluted = fit_mixture(counts, edges, anchors)
    problem = unusable(clean, polluted)
    if fallback is not None and problem:
        return fallback, f"{problem}: the anchor rule's τ"
    if fit == "valley":
        return valley_threshold(counts, edges, anchors), ""
    return mixture_threshold(counts, edges, anchors), ""

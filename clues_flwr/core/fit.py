"""The histogram rule's fits: where clean ends in the sites' pooled score histograms.

The sites send only counts over bin edges the server fixed from the clean reference before
any site scored; the server sums them and fits the pooled distribution. Two fits:

- ``mixture``: a two-component Gaussian mixture fitted by EM to the binned counts, the clean
  component the one under which the reference is likelier; τ maximises the F1 the fitted
  mixture expects (keep s ≥ τ, positive = clean).
- ``valley``: the lowest point of the smoothed pooled histogram between the clean mode (the
  one the reference sits in) and the nearest mode below it; the mixture's τ when there is
  no mode below.

Both see only the histogram, so τ is resolved to about one bin. When the fitted mixture
cannot say where clean ends (its components overlap, Ashman's D < 2, as on a backbone that
has not read the sites' facts; or the second one is a sliver or lies above the clean one),
the caller's fallback τ is used and a note says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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

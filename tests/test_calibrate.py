"""The histogram threshold rule: τ from the sites' pooled histograms lands where the best F1
of any global τ is, on synthetic two-Gaussian scores, seeing counts only."""

import numpy as np
import pytest
import torch

from clues_flwr.core.threshold import FITS, fit_mixture, histogram, histogram_edges, histogram_threshold, unusable


def best_f1_threshold(scores: np.ndarray, clean: np.ndarray) -> float:
    """The τ of the highest F1 of keep s ≥ τ, trying every score as τ: keeping the top i
    records has F1 = 2·TP_i / (i + P)."""
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(clean[order])
    f1 = 2 * tp / (np.arange(1, scores.size + 1) + clean.sum())
    return float(scores[order][np.argmax(f1)])


def mixture(rng, n, clean_share, gap, polluted_std):
    clean = rng.normal(0.0, 1.0, int(n * clean_share))
    polluted = rng.normal(-gap, polluted_std, n - clean.size)
    return np.concatenate([clean, polluted]), np.r_[np.ones(clean.size, bool), np.zeros(polluted.size, bool)]


@pytest.mark.parametrize(
    ("clean_share", "gap", "polluted_std", "seed"),
    [(0.6, 3.0, 1.2, 0), (0.3, 2.5, 1.0, 1), (0.8, 4.0, 2.0, 2), (0.5, 5.0, 3.0, 3)],
)
def test_mixture_threshold_is_the_best_f1_threshold_within_one_bin(clean_share, gap, polluted_std, seed):
    rng = np.random.default_rng(seed)
    scores, clean = mixture(rng, 40_000, clean_share, gap, polluted_std)
    order = rng.permutation(scores.size)
    sites = np.array_split(order, 4)  # four sites, each a different slice of the mixture
    anchors = rng.normal(0.0, 1.0, 10)
    edges = histogram_edges(torch.tensor(anchors), 40)
    histograms = [histogram(scores[idx].tolist(), edges) for idx in sites]
    tau, note = histogram_threshold(histograms, edges, anchors.tolist(), "mixture", 99.0)
    assert note == ""
    assert abs(tau - best_f1_threshold(scores, clean)) <= edges[1] - edges[0]


def test_mixture_recovers_the_components_from_counts_alone():
    rng = np.random.default_rng(4)
    scores, _ = mixture(rng, 50_000, 0.4, 3.0, 0.7)
    edges = np.linspace(-6.0, 3.0, 61)  # both tails beyond the edges: censored bins
    counts = np.asarray(histogram(scores.tolist(), edges.tolist()), dtype=float)
    (wc, mc, sc), (wp, mp, sp) = fit_mixture(counts, edges, np.array([-0.2, 0.1, 0.4]))
    assert (wc, mc, sc) == pytest.approx((0.4, 0.0, 1.0), abs=0.03)
    assert (wp, mp, sp) == pytest.approx((0.6, -3.0, 0.7), abs=0.03)


@pytest.mark.parametrize("fit", FITS)
def test_every_fit_separates_well_separated_scores(fit):
    rng = np.random.default_rng(6)
    scores, clean = mixture(rng, 4_000, 0.5, 6.0, 1.0)
    anchors = rng.normal(0.0, 1.0, 10)
    edges = histogram_edges(torch.tensor(anchors), 40)
    tau, _ = histogram_threshold([histogram(scores.tolist(), edges)], edges, anchors.tolist(), fit, None)
    kept = scores >= tau
    assert np.mean(kept[clean]) > 0.97 and np.mean(kept[~clean]) < 0.03


def test_unimodal_scores_fall_back_to_the_anchor_rule():
    rng = np.random.default_rng(7)
    scores, _ = mixture(rng, 4_000, 0.5, 0.8, 1.0)  # overlapping: one hump
    anchors = rng.normal(0.0, 1.0, 10)
    edges = histogram_edges(torch.tensor(anchors), 40)
    tau, note = histogram_threshold([histogram(scores.tolist(), edges)], edges, anchors.tolist(), "mixture", -0.25)
    assert tau == -0.25 and "not bimodal" in note


def test_bad_histograms_are_refused():
    edges = [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="different bins"):
        histogram_threshold([[1, 2, 3, 4], [1, 2, 3]], edges, [1.0], "mixture", None)
    with pytest.raises(ValueError, match="len\\(edges\\) \\+ 1"):
        histogram_threshold([[1, 2, 3]], edges, [1.0], "mixture", None)
    with pytest.raises(ValueError, match="histogram-fit"):
        histogram_threshold([[1, 2, 3, 4]], edges, [1.0], "median", None)


def test_a_pile_of_identical_top_scores_does_not_pass_for_pollution():
    rng = np.random.default_rng(8)
    clean = rng.normal(0.0, 1.0, 3_000)
    pile = np.full(40, 3.5)  # identical top scores (a loss floor), far above the rest
    anchors = rng.normal(0.0, 1.0, 10)
    edges = histogram_edges(torch.tensor(anchors), 40)
    counts = [histogram(np.concatenate([clean, pile]).tolist(), edges)]
    tau, note = histogram_threshold(counts, edges, anchors.tolist(), "mixture", -1.3)
    assert tau == -1.3 and note


@pytest.mark.parametrize(
    ("polluted", "reason"),
    [
        ((0.5, -1.0, 1.0), "not bimodal"),
        ((0.03, -6.0, 0.5), "holds only 3.0%"),
        ((0.2, 6.6, 0.1), "above the clean one"),
        ((0.4, -6.0, 1.0), ""),
    ],
)
def test_unusable_mixtures_say_why(polluted, reason):
    result = unusable((0.6, 0.0, 1.0), polluted)
    assert (reason in result) if reason else result == ""

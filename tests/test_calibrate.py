"""The histogram threshold rule: τ from the sites' pooled histograms lands where the best F1
of any global τ is, on synthetic two-Gaussian scores, seeing counts only."""

import math

import numpy as np
import pytest
import torch

from clues_flwr.core.fit import (
    FITS,
    Mixture,
    fit_mixture,
    histogram_threshold,
    mixture_threshold,
    pooled,
    unusable,
    valley_threshold,
)
from clues_flwr.core.threshold import global_threshold, histogram, histogram_edges, standard


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
    edges = np.linspace(-4.0, 1.5, 45)  # censored open ends holding about 7 % of the records
    counts = np.asarray(histogram(scores.tolist(), edges.tolist()), dtype=float)
    assert 0.05 < (counts[0] + counts[-1]) / counts.sum() < 0.1
    fit = fit_mixture(counts, edges, np.array([-0.2, 0.1, 0.4]))
    (wc, mc, sc), (wp, mp, sp) = fit.clean, fit.polluted
    assert fit.converged
    assert (wc, mc, sc) == pytest.approx((0.4, 0.0, 1.0), abs=0.03)
    assert (wp, mp, sp) == pytest.approx((0.6, -3.0, 0.7), abs=0.03)


def test_em_runs_to_its_tolerance_on_an_overlapping_mixture():
    """Overlapping components take EM well over 300 iterations: stopped early, the fit is
    still moving (τ two bins off in this case); run to the tolerance, it finds them."""
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0.0, 1.0, 14_000), rng.normal(-2.0, 1.0, 6_000)]
    anchors = rng.normal(0.0, 1.0, 10)
    edges = histogram_edges(torch.tensor(anchors), 40)
    fit = fit_mixture(np.asarray(histogram(scores.tolist(), edges), dtype=float), edges, anchors)
    assert fit.converged
    assert fit.clean == pytest.approx((0.7, 0.0, 1.0), abs=0.03)
    assert fit.polluted == pytest.approx((0.3, -2.0, 1.0), abs=0.04)


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


def test_the_standard_and_the_fallback_come_from_the_whole_clean_reference():
    """60 reference scores (validation + anchors) against the 10 anchors among them: the edges
    span the reference, anchor-mean stays the paper's mean of the anchors, and a unimodal
    pooled histogram falls back to the k-th smallest of the 60 (k = ⌊0.1 · 61⌋ = 6), a recall
    bound ten anchors cannot give (with 10, k = 1: the smallest anchor)."""
    rng = np.random.default_rng(9)
    reference = rng.normal(0.0, 1.0, 60)
    anchors = reference[50:]
    fixed = standard(anchors, reference, "histogram", 0.9, 40)
    spread = reference.max() - reference.min()
    assert fixed.edges[0] == pytest.approx(reference.min() - spread) and fixed.threshold is None
    assert fixed.edges[-1] == pytest.approx(reference.max() + spread) and len(fixed.edges) == 41
    mean_rule = standard(anchors, reference, "anchor-mean", 0.9, 40)
    assert mean_rule.threshold == pytest.approx(anchors.mean()) and mean_rule.edges == []
    scores, _ = mixture(rng, 4_000, 0.5, 0.8, 1.0)  # overlapping: one hump
    tau, rule, note = global_threshold(fixed, [histogram(scores.tolist(), fixed.edges)], "histogram", "mixture", 0.9)
    assert tau == np.sort(reference)[5] and "anchor-quantile" in rule and "anchor rule" in note
    assert standard(anchors, reference, "anchor-quantile", 0.9, 40).threshold == tau


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
    result = unusable(Mixture((0.6, 0.0, 1.0), polluted, True))
    assert (reason in result) if reason else result == ""


def test_a_fit_that_did_not_converge_or_is_not_finite_is_unusable():
    assert "did not converge" in unusable(Mixture((0.6, 0.0, 1.0), (0.4, -6.0, 1.0), False))
    assert "non-finite" in unusable(Mixture((0.6, 0.0, 1.0), (float("nan"), -6.0, 1.0), True))


def test_the_sites_histograms_are_pooled_bin_by_bin():
    """Sites with different pollution: the pooled fit equals the fit of all scores in one."""
    rng = np.random.default_rng(11)
    sites = [mixture(rng, 1_000, share, 5.0, 1.0)[0] for share in (0.2, 0.8, 0.5)]
    anchors = rng.normal(0.0, 1.0, 10)
    edges = histogram_edges(torch.tensor(anchors), 40)
    apart = [histogram(x.tolist(), edges) for x in sites]
    together = [histogram(np.concatenate(sites).tolist(), edges)]
    assert pooled(apart).tolist() == pooled(together).tolist()
    assert histogram_threshold(apart, edges, anchors.tolist(), "mixture", None) == histogram_threshold(
        together, edges, anchors.tolist(), "mixture", None
    )
    assert histogram_threshold(apart[:1] * 3, edges, anchors.tolist(), "mixture", None) != histogram_threshold(
        apart, edges, anchors.tolist(), "mixture", None
    ), "one site's histogram thrice is not the federation's"


def test_the_valley_is_the_lowest_point_between_the_clean_mode_and_the_one_below():
    """Two humps with an empty gap between -3 and -1: the valley is in the gap, above the
    lower hump and below the clean one."""
    rng = np.random.default_rng(12)
    clean = rng.normal(1.0, 0.5, 2_000)
    polluted = rng.normal(-5.0, 0.5, 1_000)
    anchors = rng.normal(1.0, 0.5, 10)
    edges = np.linspace(-7.0, 3.0, 41).tolist()
    counts = np.asarray(histogram(np.concatenate([clean, polluted]).tolist(), edges), dtype=float)
    fit = fit_mixture(counts, edges, anchors)
    tau = valley_threshold(counts, edges, anchors, fit)
    assert -3.5 <= tau <= -0.5
    misfit = Mixture((0.67, 1.0, 0.5), (0.33, -1.0, 3.0), True)  # a poor fit puts its τ elsewhere
    assert not -3.5 <= mixture_threshold(edges, misfit) <= -0.5
    assert valley_threshold(counts, edges, anchors, misfit) == tau, "the valley is read off the counts"
    one_hump = np.asarray(histogram(clean.tolist(), edges), dtype=float)
    fit = fit_mixture(one_hump, edges, anchors)
    assert valley_threshold(one_hump, edges, anchors, fit) == mixture_threshold(edges, fit), "no mode below"


def test_the_mixture_threshold_maximises_f1_not_accuracy():
    """Under a known mixture the best-F1 τ and the best-accuracy τ lie bins apart; the rule
    must land on the F1 one (a plain per-τ loop with math.erf is the reference)."""
    clean, polluted = (0.1, 0.0, 1.0), (0.9, -4.0, 2.5)
    edges = np.linspace(-6.0, 3.0, 41).tolist()

    def kept(tau, weight, mean, std):
        return weight * 0.5 * math.erfc((tau - mean) / (std * math.sqrt(2)))

    grid = np.linspace(-6.0, 3.0, 9001)
    f1 = [2 * kept(t, *clean) / (clean[0] + kept(t, *clean) + kept(t, *polluted)) for t in grid]
    accuracy = [kept(t, *clean) + polluted[0] - kept(t, *polluted) for t in grid]
    best_f1, best_accuracy = grid[int(np.argmax(f1))], grid[int(np.argmax(accuracy))]
    width = edges[1] - edges[0]
    assert abs(best_f1 - best_accuracy) > 3 * width
    assert abs(mixture_threshold(edges, Mixture(clean, polluted, True)) - best_f1) <= width / 20

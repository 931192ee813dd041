"""The run folder's figures: the sites' score histograms against τ, and the loss per round.

matplotlib is imported when a figure is drawn, not with the library: a user's server that
never plots neither pays for it nor has its backend chosen for it.
"""

from __future__ import annotations

import sys
from pathlib import Path

SCORE_NAMES = {
    "clues": "CLUES score S(z)",
    "perplexity": "perplexity score (−mean answer loss)",
    "ifd": "IFD score",
    "datainf": "DataInf score",
    "random": "random score",
}


def _pyplot():
    """pyplot, on the file-only Agg backend (a server has no display) unless the process
    imported pyplot already, whose backend is then the process's own choice."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_name(method: str) -> str:
    """The axis name of the score a selection thresholds: a combination is a sum of z-scores."""
    signals = method.split("+")
    if len(signals) == 1:
        return SCORE_NAMES.get(method, f"{method} score")
    return f"{' + '.join(signals)} (sum of z-scores against the anchors)"


def open_ends(histogram: list[int], total: int) -> str:
    """The share of a site's records in the open end bins, for its legend entry."""
    below, above = histogram[0] / total, histogram[-1] / total
    return "".join(
        f"; {share:.0%} {where} the bins" for share, where in ((below, "below"), (above, "above")) if share >= 0.005
    )


def plot_selection(selection: dict, path: Path) -> None:
    """Site score histograms over the server's fixed bins, anchors as ticks, τ as a line.

    The outer bins hold everything below the first and above the last edge; they are drawn
    one bin wide beyond the edges, and the legend says what share of each site they hold
    (the edges come from the anchors before any site's score exists, so heavily polluted
    sites have much of their mass below them).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    inner = 0.0  # the tallest bin within the edges: the axis is scaled to it, not to the pile below
    for node, row in selection["clients"].items():
        edges = row["edges"]
        if not edges:  # an anchor rule: no site sent a histogram
            continue
        width = edges[1] - edges[0]
        centres = [edges[0] - width / 2] + [(a + b) / 2 for a, b in zip(edges, edges[1:])] + [edges[-1] + width / 2]
        total = max(sum(row["histogram"]), 1)
        inner = max(inner, *(c / total for c in row["histogram"][1:-1]))
        ax.step(
            centres,
            [c / total for c in row["histogram"]],
            where="mid",
            label=f"{row.get('site', node)} ({row['kept']}/{row['total']} kept{open_ends(row['histogram'], total)})",
        )
    shown = set()
    for row in selection["clients"].values():
        key = (row["threshold"], tuple(row["anchor-scores"]))
        if key in shown or row["threshold"] is None:
            continue
        shown.add(key)
        ax.plot(row["anchor-scores"], [0] * len(row["anchor-scores"]), "k|", markersize=14)
        ax.axvline(row["threshold"], color="k", linestyle="--", linewidth=1)
    ax.set_xlabel(f"{score_name(selection['selection'])}  (ticks: anchors, dashed: τ)")
    ax.set_ylabel("share of the site's records")
    if inner:
        ax.set_ylim(top=1.3 * inner)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rounds(table: list[dict], path: Path) -> None:
    """Train, test and held-out loss per tuning round (each where it was measured)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for key, label in (("train-loss", "train"), ("test-loss", "test"), ("heldout-loss", "held-out (sites)")):
        points = [(row["round"], row[key]) for row in table if key in row]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label)
    ax.set_xlabel("tuning round (0: before tuning)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

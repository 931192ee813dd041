"""What the selection stage learned, as the server keeps and shows it: per site its counts
and the standard it was held to, the trace's metrics, every failure, and the warnings a
user reads before tuning (the guards). Never a record or a per-record score."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from clues_flwr.config import SelectionConfig
from clues_flwr.core.metrics import selection_scores
from clues_flwr.flower.exchange import Failures
from clues_flwr.flower.log import say
from clues_flwr.flower.protocol import CONFUSION


@dataclasses.dataclass
class SelectionReport:
    """What the selection stage learned: never a record or a per-record score.

    Parameters
    ----------
    selection, threshold_rule : str
        The selection (``clues``, ``clues+perplexity``, a baseline) and the threshold rule.
    target_recall, keep_ratio : float
        The anchor-quantile target (also the histogram rule's fallback) and the fixed share
        (0: the threshold).
    clients : dict[int, dict]
        Per node: ``site`` (its label, else ``node <id>``), ``kept``, ``total``, the score histogram, τ, the
        histogram edges, the anchor scores and, for labelled records, ``tp fp fn tn``.
    trace : dict[int, dict]
        The trace rounds' aggregated metrics.
    failures : Failures
        Every reply a phase could not use (``where``, ``node``, ``reason``).
    warnings : list[str]
        Sites that kept nothing or everything, records passing τ more often than the anchors,
        a histogram rule that fell back to the anchors.
    """

    selection: str
    threshold_rule: str
    target_recall: float
    keep_ratio: float
    clients: dict[int, dict] = dataclasses.field(default_factory=dict)
    trace: dict[int, dict] = dataclasses.field(default_factory=dict)
    failures: Failures = dataclasses.field(default_factory=Failures)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int] | None:
        """Confusion counts summed over the sites that sent them (labelled records, labels
        allowed to be read, exact counts); None when none did."""
        labelled = [r for r in self.clients.values() if "tp" in r]
        if not labelled:
            return None
        return {k: sum(r[k] for r in labelled) for k in CONFUSION}

    def to_state(self) -> dict[str, Any]:
        """All of it as JSON, for the run state and ``metrics.json``; ``selection`` is
        empty when no score phase ran (``none``, ``oracle``)."""
        return {
            "selection": self.to_json() if self.clients else {},
            "trace": {str(r): dict(m) for r, m in self.trace.items()},
            "failures": list(self.failures),
        }

    @classmethod
    def of(cls, selection: SelectionConfig, state: dict[str, Any] | None = None) -> "SelectionReport":
        """The report for ``selection``: empty, or as a run state saved it."""
        report = cls(selection.selection, selection.threshold_rule, selection.target_recall, selection.keep_ratio)
        if state:
            report.clients = {int(n): row for n, row in state["selection"].get("clients", {}).items()}
            report.trace = {int(r): m for r, m in state["trace"].items()}
            report.failures.extend(state["failures"])
            report.failures.names.update({n: row["site"] for n, row in report.clients.items() if "site" in row})
            report.warnings = list(state["selection"].get("warnings", []))
        return report

    def say_scores(self) -> None:
        """The selection's precision, recall and F1 on the console, where sites sent labels."""
        summary = self.to_json()
        if "f1" in summary:
            sites = summary["labelled-sites"]
            over = "" if len(sites) == len(self.clients) else f" over the labelled sites {', '.join(sites)}"
            say(
                "selection (positive = clean){over}: precision {precision:.1f}, recall {recall:.1f}, "
                "F1 {f1:.1f}, accuracy {accuracy:.1f}".format(over=over, **summary)
            )

    def to_json(self) -> dict[str, Any]:
        """``selection.json``: the rule, the sites, and precision/recall/F1 when labelled."""
        out = {
            "selection": self.selection,
            "threshold-rule": self.threshold_rule,
            "target-recall": self.target_recall,
            "keep-ratio": self.keep_ratio,
            "clients": {str(n): r for n, r in self.clients.items()},
            "warnings": self.warnings,
        }
        if self.counts:
            labelled = [r["site"] for r in self.clients.values() if "tp" in r]
            out.update(counts=self.counts, **selection_scores(self.counts), **{"labelled-sites": labelled})
        return out


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

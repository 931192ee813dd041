"""A site's own report of what the selection did to its data, written in its ``state-dir``
and never sent: what it released (its ledger entry, the counts it sent beside the true
ones), and per record of its data file, by line, each signal, the combined score and whether
it was kept, dropped or held out for evaluation; beside it a plot of the site's own score
distribution against τ."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from clues_flwr.flower.ledger import write_atomic


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


def write(
    path: Path,
    site: Any,
    scores: torch.Tensor,
    signals: dict[str, torch.Tensor],
    mask: torch.Tensor,
    request: Any,
    ledger: dict,
    sent: dict,
) -> None:
    """``path`` (JSON) and the plot beside it (same name, ``.png``)."""
    combined = scores.tolist()
    signals = {n: v.tolist() for n, v in signals.items()}
    lines = site.origins or list(range(1, len(site.records) + 1))
    records = [
        {
            "line": line,
            "signals": {n: _number(v[i]) for n, v in signals.items()},
            "score": _number(combined[i]),
            "status": "kept" if bool(mask[i]) else "dropped",
        }
        for i, line in enumerate(lines)
    ]
    records += [{"line": line, "status": "held out"} for line in site.heldout]
    records.sort(key=lambda r: r["line"])
    report = {
        "threshold": request.threshold,
        "keep-ratio": request.keep_ratio,
        "true": {"kept": int(mask.sum()), "total": len(site.records), "held-out": len(site.heldout)},
        "sent": sent,
        "ledger": ledger,
        "records": records,
    }
    write_atomic(path, json.dumps(report, indent=1).encode())
    plot(combined, request.threshold, path.with_suffix(".png"))


def plot(scores: list[float], threshold: float | None, path: Path) -> None:
    """The site's scores as a histogram, τ as a line. A Figure without pyplot: no backend is
    set for the process it runs in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = [s for s in scores if math.isfinite(s)]
    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.hist(finite, bins=max(min(len(finite) // 3, 40), 1), color="tab:blue", alpha=0.8)
    if threshold is not None:
        axes.axvline(threshold, color="tab:red", label=f"τ = {threshold:.4g}")
        axes.legend()
    axes.set_xlabel("combined score of this site's records")
    axes.set_ylabel("records")
    figure.tight_layout()
    figure.savefig(path.with_name(path.name + ".partial"), format="png")
    path.with_name(path.name + ".partial").replace(path)

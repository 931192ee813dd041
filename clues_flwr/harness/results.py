"""The results folder the experiment drivers share: per driver a JSON file, a Markdown
table and PNG plots, and one ``report.md`` that gathers every table and links every plot.

Each driver calls ``write`` once at its end; the report is rebuilt from what the folder
holds, so drivers can run in any order and again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPORT = "report.md"


def command_line(script: str, argv: list[str] | None) -> str:
    """How to rerun a driver: its path and arguments (``argv`` None: the process's own)."""
    return " ".join([f"python simulation/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure(size=(6.4, 3.6), ncols: int = 1):
    """(figure, axes): one axis, or a row of ``ncols``."""
    return plt.subplots(1, ncols, figsize=size)


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(out: Path, name: str, title: str, command: str, data: dict, table: str, figures: Sequence[Path] = ()) -> None:
    """``name.json`` (with the command and date), ``name.md``, then the report."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    (out / f"{name}.json").write_text(json.dumps({"command": command, "date": stamp, **data}, indent=2) + "\n")
    plots = "".join(f"\n![{p.stem}]({p.name})\n" for p in figures)
    (out / f"{name}.md").write_text(f"## {title}\n\n`{command}` ({stamp})\n\n{table}{plots}")
    sections = [p.read_text() for p in sorted(out.glob("*.md")) if p.name != REPORT]
    (out / REPORT).write_text("# CLUES experiments on the demo\n\n" + "\n".join(sections))
    print(f"wrote {out / f'{name}.md'} and {out / REPORT}")


def score_histogram(ax, scores: dict, clean: dict[str, list[bool]], taus: dict[str, float], title: str) -> None:
    """Clean and polluted scores pooled over sites, with each τ as a vertical line."""
    pooled = torch.cat([scores[k] for k in clean]).numpy()
    truth = np.array([c for k in clean for c in clean[k]])
    edges = np.histogram_bin_edges(pooled, bins=30)
    ax.hist(pooled[truth], bins=edges, alpha=0.6, label="clean")
    ax.hist(pooled[~truth], bins=edges, alpha=0.6, label="polluted")
    for i, (label, tau) in enumerate(taus.items()):
        ax.axvline(tau, color=f"C{i + 2}", linestyle="--", label=f"τ {label}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("score (higher = keep)", fontsize=8)

"""The run folder: final adapter, per-round metrics, the selection summary and its plot.

Named ``NAME.partial`` until the run completes, so a crash never leaves a folder that looks
finished; meanwhile ``state/`` (see ``resume``) lets ``resume-from`` continue it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def per_round(*sources: dict[int, dict]) -> list[dict]:
    """One row per round (0 = before training) joining client and server metrics."""
    rows: dict[int, dict] = {}
    for source in sources:
        for rnd, record in source.items():
            rows.setdefault(rnd, {"round": rnd}).update({k: v for k, v in record.items() if k != "num-examples"})
    return [rows[r] for r in sorted(rows)]


def plot_selection(selection: dict, path: Path) -> None:
    """Client score histograms over the server's fixed bins, anchors as ticks, τ as a line.

    The outer bins hold everything below the first and above the last edge; they are drawn
    one bin wide beyond the edges.
    """
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for node, row in selection["clients"].items():
        edges = row["histogram-edges"]
        width = edges[1] - edges[0]
        centres = [edges[0] - width / 2] + [(a + b) / 2 for a, b in zip(edges, edges[1:])] + [edges[-1] + width / 2]
        total = max(sum(row["histogram"]), 1)
        ax.step(
            centres,
            [c / total for c in row["histogram"]],
            where="mid",
            label=f"client {node} ({row['kept']}/{row['total']} kept)",
        )
    shown = set()
    for row in selection["clients"].values():
        key = (row["threshold"], tuple(row["anchor-scores"]))
        if key in shown:
            continue
        shown.add(key)
        ax.plot(row["anchor-scores"], [0] * len(row["anchor-scores"]), "k|", markersize=14)
        ax.axvline(row["threshold"], color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("CLUES score S(z)  (ticks: anchors, dashed: threshold τ)")
    ax.set_ylabel("share of the client's records")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PARTIAL = ".partial"


def open_run(out_dir: Path, run_id: int, config: dict) -> Path:
    """A new run folder, named ``NAME.partial`` until the run completes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}{PARTIAL}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def resumable(folder: Path, config: dict, free: tuple[str, ...]) -> Path:
    """``folder`` if it is a run folder with a saved state and the same run config, up to
    the ``free`` keys (e.g. the number of rounds); else one error that says why not."""
    if not (folder / "state" / "state.json").is_file():
        raise ValueError(
            f"resume-from {folder}: no saved state (state/state.json); "
            "not a run folder of this app, or the run stopped before its score phase"
        )
    saved = json.loads((folder / "config.json").read_text())["run_config"]
    now = config["run_config"]
    changed = sorted(k for k in set(saved) | set(now) if k not in free and saved.get(k) != now.get(k))
    if changed:
        raise ValueError(
            f"resume-from {folder}: the run config differs in {', '.join(changed)}; only {', '.join(free)} may change"
        )
    return folder


def finish_run(folder: Path, model, rounds: list[dict], report: dict) -> Path:
    """Write the final adapter, metrics and selection, then drop the ``.partial`` suffix."""
    model.save_pretrained(folder / "adapter")
    metrics = {"rounds": rounds, "trace": report.get("trace", {}), "failures": report.get("failures", [])}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if report.get("selection"):
        (folder / "selection.json").write_text(json.dumps(report["selection"], indent=2) + "\n")
        if report["selection"].get("clients"):
            plot_selection(report["selection"], folder / "selection.png")
    if not folder.name.endswith(PARTIAL):
        return folder
    final = folder.with_name(folder.name[: -len(PARTIAL)])
    folder.rename(final)
    return final

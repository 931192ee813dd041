"""Does selection pay? The same federation trained on all records (``none``), on the
records CLUES keeps (``clues``), and on the clean records only (``oracle``).

    python simulation/compare_selection.py                  # the demo's defaults, ~4 min on 2 cores
    python simulation/compare_selection.py --set aggregation=ties --set num-server-rounds=8

Each run is the real ServerApp and ClientApp on an in-process grid (no Ray), so the only
difference between rows is the ``selection`` key. Prints the final test loss per row and
how much of the oracle's improvement over ``none`` CLUES recovers:
(loss_none − loss_clues) / (loss_none − loss_oracle).
"""

from __future__ import annotations

import argparse
import json
import time
import tomllib
from pathlib import Path

from clues_flwr import client_app
from clues_flwr.local_grid import LocalGrid, app_defaults, demo_nodes
from clues_flwr.server_app import run_clues


def parse_set(items: list[str]) -> dict:
    """``key=value`` pairs with TOML values (``8``, ``0.5``, ``"ties"`` or bare ``ties``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def run_row(cfg: dict, nodes: int) -> dict:
    """One federation on the in-process grid: final test loss and accuracy, the loss per
    round and, when there was a score phase, the selection's P/R/F1/accuracy and τ."""
    start = time.time()
    folder = run_clues(LocalGrid(client_app.app, demo_nodes(nodes), cfg), cfg)
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    row = {
        "selection": cfg["selection"],
        "test-loss": rounds[-1]["test-loss"],
        "test-accuracy": rounds[-1]["test-accuracy"],
        "loss-per-round": [r["test-loss"] for r in rounds],
        "seconds": round(time.time() - start, 1),
        "run": str(folder),
    }
    if (folder / "selection.json").exists():
        sel = json.loads((folder / "selection.json").read_text())
        row.update({k: sel.get(k) for k in ("precision", "recall", "f1", "accuracy")})
        row["threshold"] = next(iter(sel["clients"].values()))["threshold"]
    return row


def recovery(rows: list[dict], method: str = "clues") -> float | None:
    """(loss_none − loss_method) / (loss_none − loss_oracle), when all three ran."""
    by = {r["selection"]: r["test-loss"] for r in rows}
    if {"none", method, "oracle"} <= set(by) and by["none"] != by["oracle"]:
        return (by["none"] - by[method]) / (by["none"] - by["oracle"])
    return None


def config(overrides: dict, **more) -> dict:
    """The app's defaults with ``overrides``; unknown keys stop the driver."""
    defaults = app_defaults()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise SystemExit(f"unknown run-config keys: {', '.join(unknown)}")
    return {**defaults, **overrides, **more}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--selections", nargs="+", default=["none", "clues", "oracle"])
    p.add_argument("--out", type=Path, default=Path("runs/compare_selection"))
    args = p.parse_args()

    overrides = parse_set(args.set)
    rows = [
        run_row(config(overrides, selection=s, **{"output-dir": str(args.out / s)}), args.nodes)
        for s in args.selections
    ]
    print("\n| selection | final test loss | test accuracy | selection P / R / F1 | seconds |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        sel = f"{r['precision']:.1f} / {r['recall']:.1f} / {r['f1']:.1f}" if r.get("f1") is not None else "-"
        print(f"| {r['selection']} | {r['test-loss']:.4f} | {r['test-accuracy']:.3f} | {sel} | {r['seconds']} |")
    share = recovery(rows)
    if share is not None:
        print(f"\nCLUES recovers {100 * share:.1f}% of the oracle's improvement over no selection")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"nodes": args.nodes, "overrides": overrides, "rows": rows, "recovery": share}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()

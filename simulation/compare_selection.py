"""Does selection pay? The same federation trained on all records (``none``), on the
records the default selection keeps (or any ``--selections``), and on the clean records only
(``oracle``).

    python simulation/compare_selection.py                  # the demo's defaults, ~2 min on 2 cores
    python simulation/compare_selection.py --set aggregation=ties --set num-server-rounds=8
    python simulation/compare_selection.py --seeds 0 1 2 --selections none clues+perplexity oracle

Each run is the real ServerApp and ClientApp on an in-process grid (no Ray), so the only
difference between rows is the ``selection`` key. Prints the final test loss per row and
how much of the oracle's improvement over ``none`` each selection recovers:
(loss_none − loss_selection) / (loss_none − loss_oracle).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clues_flwr.config import DataConfig, SelectionConfig
from clues_flwr.harness.bench import federation, parse_set, recovery, run_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--selections", nargs="+", default=["none", SelectionConfig.selection, "oracle"])
    p.add_argument("--seeds", type=int, nargs="+", help="one federation per seed each (default: the run's seed)")
    p.add_argument("--out", type=Path, default=Path("runs/compare_selection"))
    args = p.parse_args()

    overrides = parse_set(args.set)
    runs = {}
    for seed in args.seeds or [overrides.get("seed", DataConfig.seed)]:
        out = args.out / f"seed{seed}"
        runs[seed] = [
            federation(run_config(overrides, selection=s, seed=seed, **{"output-dir": str(out / s)}), args.nodes)
            for s in args.selections
        ]
    print("\n| seed | selection | final test loss | test accuracy | selection P / R / F1 | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, rows in runs.items():
        for r in rows:
            sel = f"{r['precision']:.1f} / {r['recall']:.1f} / {r['f1']:.1f}" if r.get("f1") is not None else "-"
            cells = [seed, r["selection"], f"{r['test-loss']:.4f}", f"{r['test-accuracy']:.3f}", sel, r["seconds"]]
            print("| " + " | ".join(map(str, cells)) + " |")
    methods = [s for s in args.selections if s not in ("none", "oracle")]
    shares = {m: {seed: recovery(rows, m) for seed, rows in runs.items()} for m in methods}
    for m, per_seed in shares.items():
        if all(v is not None for v in per_seed.values()):
            each = " / ".join(f"{100 * v:.1f}" for v in per_seed.values())
            mean = 100 * sum(per_seed.values()) / len(per_seed)
            print(f"{m} recovers {each} % of the oracle's improvement over no selection (mean {mean:.1f} %)")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"nodes": args.nodes, "overrides": overrides, "runs": runs, "recovery": shares}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()

"""The paper's Tables 1-2 on the demo: what each data selection does to the model the
federation trains, under FedAvg, TIES and one-shot merging.

    python simulation/downstream_table.py                 # ~15 min on 2 CPU cores
    python simulation/downstream_table.py --setups fedavg --set num-server-rounds=8

Rows: mixed data (no selection), the oracle (clean records only), the baselines perplexity,
IFD, FedDQC's IRA and DataInf, CLUES, CLUES + perplexity, and the app's default (CLUES,
perplexity, end- and head-loss and IFD); each at the app's defaults
apart from ``selection`` and the setup. Cells: final test loss and exact-match answer accuracy
on the public test set, and the share of the oracle's improvement over mixed data that the method recovers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clues_flwr.config import SelectionConfig
from clues_flwr.harness.bench import federation, parse_set, recovery, run_config
from clues_flwr.harness.results import command_line, figure, markdown_table, save_figure, write

SETUPS = {
    "fedavg": {"mode": "federated", "aggregation": "fedavg"},
    "ties": {"mode": "federated", "aggregation": "ties"},
    "merge": {"mode": "merge", "aggregation": "ties"},
}
DEFAULT = SelectionConfig.selection
SELECTIONS = ["none", "oracle", "perplexity", "ifd", "ira", "datainf", "clues", "clues+perplexity", DEFAULT]
NAMES = {
    "none": "mixed data",
    "oracle": "oracle",
    "perplexity": "PPL",
    "ifd": "IFD",
    "ira": "IRA (FedDQC)",
    "datainf": "DataInf",
    "clues": "CLUES",
    "clues+perplexity": "CLUES + PPL",
    DEFAULT: "CLUES + PPL + end + head + IFD (default)",
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    p.add_argument("--methods", nargs="+", choices=SELECTIONS, default=SELECTIONS)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)

    overrides = parse_set(args.set)
    results = {}
    for setup in args.setups:
        rows = []
        for method in args.methods:
            runs = args.out / "runs" / f"downstream-{setup}-{method}"
            cfg = run_config(overrides, **SETUPS[setup], selection=method, **{"output-dir": str(runs)})
            rows.append(federation(cfg, args.nodes))
            print(f"{setup} {method}: test loss {rows[-1]['test-loss']:.4f}, accuracy {rows[-1]['test-accuracy']:.3f}")
        results[setup] = rows

    header = ["method"] + [f"{s}: {c}" for s in args.setups for c in ("test loss", "accuracy", "recovered")]
    table_rows = []
    for method in args.methods:
        cells = [NAMES[method]]
        for setup in args.setups:
            row = next(r for r in results[setup] if r["selection"] == method)
            share = recovery(results[setup], method) if method not in ("none", "oracle") else None
            cells += [row["test-loss"], row["test-accuracy"], "-" if share is None else f"{share:.0%}"]
        table_rows.append(cells)
    table = markdown_table(header, table_rows)
    print("\n" + table)

    args.out.mkdir(parents=True, exist_ok=True)
    fig, ax = figure((7.5, 3.6))
    width = 0.8 / len(args.setups)
    for j, setup in enumerate(args.setups):
        losses = [next(r for r in results[setup] if r["selection"] == m)["test-loss"] for m in args.methods]
        ax.bar([i + j * width for i in range(len(args.methods))], losses, width, label=setup)
    ax.set_xticks(
        [i + width * (len(args.setups) - 1) / 2 for i in range(len(args.methods))], [NAMES[m] for m in args.methods]
    )
    every_loss = [r["test-loss"] for rows in results.values() for r in rows]
    ax.set_ylim(min(every_loss) * 0.95, max(every_loss) * 1.02)
    ax.set_ylabel("final test loss (lower is better)")
    ax.legend()
    plot = save_figure(fig, args.out / "downstream_table.png")
    command = command_line(__file__, argv)
    write(
        args.out,
        "downstream_table",
        "Downstream table (paper Tables 1-2)",
        command,
        {"overrides": overrides, "results": results},
        table,
        [plot],
    )


if __name__ == "__main__":
    main()

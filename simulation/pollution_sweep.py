"""The paper's Figure 4 on the demo: the same pollution ratio at every site, swept over
0, 20, 50 and 80 %, with and without CLUES selection.

    python simulation/pollution_sweep.py                       # ~10 min on 2 CPU cores
    python simulation/pollution_sweep.py --levels 0 0.5 --set num-server-rounds=8

Per level: τ, the selection's accuracy/F1 (positive = clean), the fraction kept, and the
final test loss of the federation trained on everything (``none``) and on what CLUES kept.
At 0 % every record is clean, so what CLUES drops there is the price of its threshold.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clues_flwr.harness.bench import federation, parse_set, run_config
from clues_flwr.harness.results import command_line, figure, markdown_table, save_figure, write


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=float, nargs="+", default=[0.0, 0.2, 0.5, 0.8])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)

    overrides = parse_set(args.set)
    rows = []
    for level in args.levels:
        row = {"pollution": level}
        for selection in ("none", "clues"):
            runs = args.out / "runs" / f"sweep-{level:g}-{selection}"
            result = federation(
                run_config(overrides, selection=selection, pollution=str(level), **{"output-dir": str(runs)}),
                args.nodes,
            )
            row[f"loss-{selection}"] = result["test-loss"]
            if selection == "clues":
                row.update({k: result[k] for k in ("threshold", "precision", "recall", "f1", "accuracy")})
                sel = json.loads((Path(result["run"]) / "selection.json").read_text())
                counts = sel["counts"]
                row["kept"] = (counts["tp"] + counts["fp"]) / sum(counts.values())
        rows.append(row)
        print(
            f"pollution {level:.0%}: loss none {row['loss-none']:.4f}, clues {row['loss-clues']:.4f}, "
            f"τ {row['threshold']:.4g}, selection accuracy {row['accuracy']:.1f}"
        )

    header = [
        "pollution",
        "τ",
        "kept",
        "selection accuracy",
        "precision",
        "recall",
        "F1",
        "test loss, no selection",
        "test loss, CLUES",
    ]
    table = markdown_table(
        header,
        [
            [
                f"{r['pollution']:.0%}",
                r["threshold"],
                f"{r['kept']:.0%}",
                r["accuracy"],
                r["precision"],
                r["recall"],
                r["f1"],
                r["loss-none"],
                r["loss-clues"],
            ]
            for r in rows
        ],
    )
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [100 * r["pollution"] for r in rows]
    fig, (left, right) = figure((9, 3.4), ncols=2)
    left.plot(levels, [r["loss-none"] for r in rows], "o-", label="no selection")
    left.plot(levels, [r["loss-clues"] for r in rows], "s-", label="CLUES")
    left.set(xlabel="pollution at every site (%)", ylabel="final test loss")
    left.legend()
    right.plot(levels, [r["accuracy"] for r in rows], "o-", label="selection accuracy")
    right.plot(levels, [100 * r["kept"] for r in rows], "s--", label="kept (%)")
    right.set(xlabel="pollution at every site (%)", ylabel="%")
    right.legend()
    plot = save_figure(fig, args.out / "pollution_sweep.png")
    command = command_line(__file__, argv)
    write(
        args.out,
        "pollution_sweep",
        "Pollution sweep (paper Figure 4)",
        command,
        {"overrides": overrides, "rows": rows},
        table,
        [plot],
    )


if __name__ == "__main__":
    main()

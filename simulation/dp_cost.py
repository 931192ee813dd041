"""What ε-differential privacy in the score phase costs the selection, on the demo.

Every site sets ``dp-epsilon`` (its node config) to each ε in turn; the app's own selection
stage runs on an in-process grid (trace, score, threshold: the tuning that follows does not
depend on ε). Under DP a site sends no confusion counts, so the F1 here is computed by the
driver from each site's own keep mask and its records' quality labels, which never leave the
site in the app. The noise is fresh in every run, so each ε repeats ``--repeats`` times.

    python simulation/dp_cost.py                                  # ε = 0, 1, 0.5, 0.1; ~12 min
    python simulation/dp_cost.py --epsilons 0 1 --repeats 2

Prints, per ε: F1 (mean, min, max over the repeats), the rule applied (how often the
histogram fit fell back) and τ's spread; writes ``dp_cost.json`` and ``dp_cost.md``.
"""

from __future__ import annotations

import argparse
import statistics

from flwr.app import ArrayRecord

from clues_flwr.config import AppConfig
from clues_flwr.core.metrics import confusion, selection_scores
from clues_flwr.demo import client_app
from clues_flwr.demo.task import local_split, public_sets
from clues_flwr.flower.client import SELECTION_KEY
from clues_flwr.flower.selection import CluesSelection
from clues_flwr.harness.bench import driver_arguments, driver_run_config
from clues_flwr.harness.local_grid import LocalGrid, demo_nodes
from clues_flwr.harness.results import command_line, markdown_table, write
from clues_flwr.model import cached, initial_adapter


def selection_f1(grid: LocalGrid) -> float:
    """F1 (positive = clean) of every site's keep mask against its records' labels."""
    counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for context in grid.contexts.values():
        records = local_split(context)[0]
        mask = context.state[SELECTION_KEY].to_torch_state_dict()[SELECTION_KEY].tolist()
        for key, value in confusion(mask, [r["quality"] == "high" for r in records]).items():
            counts[key] += value
    return selection_scores(counts)["f1"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 1.0, 0.5, 0.1])
    p.add_argument("--repeats", type=int, default=5)
    driver_arguments(p)
    args = p.parse_args(argv)
    run = driver_run_config(args)
    cfg = AppConfig.from_run_config(run)
    model, tokenizer = cached(cfg.model)
    public = public_sets(cfg.data)
    initial = ArrayRecord(initial_adapter(cfg.model))
    sections = {"score": cfg.score, "selection": cfg.selection, "train": cfg.train, "tune": cfg.tune}

    rows = []
    for epsilon in args.epsilons:
        runs = []
        for _ in range(args.repeats if epsilon else 1):  # without noise every run is the same
            nodes = {n: {**c, "dp-epsilon": epsilon} for n, c in demo_nodes(args.nodes).items()}
            grid = LocalGrid(client_app.app, nodes, run)
            stage = CluesSelection.from_records(
                model, tokenizer, public["validation"], public["anchor"], federation=cfg.federation, **sections
            )
            row = next(iter(stage.run(grid, initial).clients.values()))  # τ and the rule are global
            runs.append({"f1": selection_f1(grid), "threshold": row["threshold"], "rule": row["rule"]})
        f1 = [r["f1"] for r in runs]
        row = {
            "epsilon": epsilon,
            "runs": runs,
            "f1-mean": statistics.mean(f1),
            "f1-min": min(f1),
            "f1-max": max(f1),
            "fallbacks": sum("fallback" in r["rule"] for r in runs),
        }
        rows.append(row)
        print(
            f"ε {epsilon:g}: F1 {row['f1-mean']:.2f} (min {row['f1-min']:.2f}, max {row['f1-max']:.2f}) over "
            f"{len(runs)} run(s), {row['fallbacks']} fallback(s), τ "
            + ", ".join(f"{r['threshold']:.3f}" for r in runs),
            flush=True,
        )
    table = markdown_table(
        ["ε per site (0 = exact counts)", "runs", "F1 mean", "F1 min", "F1 max", "histogram fit fell back"],
        [[f"{r['epsilon']:g}", len(r["runs"]), r["f1-mean"], r["f1-min"], r["f1-max"], r["fallbacks"]] for r in rows],
    )
    write(
        args.out,
        "dp_cost",
        "The F1 cost of ε-DP in the score phase",
        command_line("simulation/dp_cost.py", argv),
        {"rows": rows},
        table,
    )


if __name__ == "__main__":
    main()

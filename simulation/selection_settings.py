"""How the candidate selections hold across settings and seeds: the evidence the default
selection was chosen on.

    python simulation/selection_settings.py                                   # the demo, seeds 0-2
    python simulation/selection_settings.py --setting unread model-name=/tmp/unread \\
        --setting unicode dataset=/tmp/unicode/records.jsonl model-name=/tmp/unicode/backbone \\
        pollution-kinds=cut,deletion,exchange,random-noise

Each ``--setting NAME KEY=VALUE ...`` is a run config (the app's defaults and those
overrides); ``demo`` is always the first. Per setting and seed the app's own trace and
scorers run once (``harness.bench``), then every candidate is scored by the app's rules:

- separation: pooled AUROC, AUROC against each pollution kind, and best-τ F1 (the F1 of the
  best single global τ, what a perfect threshold rule would reach);
- the rule F1 under the histogram rule's fits and the reference quantile, and how far each
  demo site's kept share lies from its clean share;
- the same with every signal standardised and every τ set against the 10 anchors alone
  (the old reference) instead of validation + anchors, to measure what the larger reference
  changes.

Writes ``selection_settings.json`` and ``.md`` into ``--out``; means are over seeds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from clues_flwr.harness.bench import (
    DEFAULT,
    VARIANTS,
    anchors_as_reference,
    baseline_set_scores,
    combined_scores,
    parse_set,
    prepare,
    raw_gradients,
    run_config,
    select,
    separation,
    variant_scores,
)
from clues_flwr.harness.results import command_line, markdown_table, write

SIGNALS = ("perplexity", "end-loss", "peak-loss", "head-loss", "ifd", "ira")
CANDIDATES = {  # label: signals summed after standardisation (one signal: as it is)
    "CLUES": ("clues",),
    "CLUES + perplexity": ("clues", "perplexity"),
    "perplexity": ("perplexity",),
    "IFD": ("ifd",),
    "IRA (FedDQC)": ("ira",),
    "end-loss": ("end-loss",),
    "head-loss": ("head-loss",),
    "peak-loss": ("peak-loss",),
    "perplexity + end + IFD": ("perplexity", "end-loss", "ifd"),
    "perplexity + end + head": ("perplexity", "end-loss", "head-loss"),
    "perplexity + end + head + IFD": ("perplexity", "end-loss", "head-loss", "ifd"),
    "perplexity + end + head + IFD (min)": ("perplexity", "end-loss", "head-loss", "ifd"),
    "perplexity + end + peak + head + IFD": ("perplexity", "end-loss", "peak-loss", "head-loss", "ifd"),
    "CLUES + perplexity + end + head + IFD": ("clues", "perplexity", "end-loss", "head-loss", "ifd"),
}
CANDIDATE_RULES = (("histogram", "mixture"), ("anchor-quantile", 0.9), ("anchor-mean", None))


def candidate_scores(scores: dict, signals: tuple[str, ...], rule: str, anchors_only: bool) -> dict:
    """Every set's selection score, standardised against validation + anchors (the app) or,
    ``anchors_only``, against the anchors alone."""
    if anchors_only:
        scores = {m: anchors_as_reference(s, s["anchors"]) for m, s in scores.items()}
    return combined_scores(scores, rule, signals)


def measure(run: dict, nodes: int) -> dict:
    """Every candidate on one setting and seed."""
    bench = prepare(run, nodes)
    raw = raw_gradients(bench, bench.sets())
    scores = {"clues": variant_scores(raw, bench.trajectory, bench.names, VARIANTS[DEFAULT])}
    scores.update(baseline_set_scores(bench, list(SIGNALS)))
    clean = bench.clean
    out = {}
    for label, signals in CANDIDATES.items():
        rule = "min" if label.endswith("(min)") else "sum"
        row = {}
        for reference in ("reference", "anchors"):
            s = candidate_scores(scores, signals, rule, reference == "anchors")
            sep = separation(s, bench)
            row[reference] = {"auroc": sep["pooled"], "best_f1": sep["best_f1"], "by_kind": sep["by_kind"]}
            for r in CANDIDATE_RULES:
                picked = select(s, clean, r, bench.config.selection)
                gap = [100 * (picked["kept"][k] - sum(c)) / len(c) for k, c in clean.items()]
                row[reference][picked["rule"]] = {"f1": picked["f1"], "tau": picked["tau"], "share_gap": gap}
        out[label] = row
    return out


def mean(values) -> float:
    return float(np.mean(values))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=str, default="results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {"demo": {}, **{name: parse_set(kv) for name, *kv in args.setting}}
    start = time.time()
    data = {}
    for name, overrides in settings.items():
        for seed in args.seeds:
            data.setdefault(name, {})[seed] = measure(run_config({**overrides, "seed": seed}), args.nodes)
            print(f"{name} seed {seed} measured ({time.time() - start:.0f}s)", flush=True)

    rule_labels = ["histogram (mixture)", "anchor-quantile r=0.9", "anchor-mean"]
    table = (
        f"Means over seeds {', '.join(map(str, args.seeds))}; {args.nodes} sites polluted "
        f"{run_config({})['pollution']}. AUROC of clean over polluted, best-τ F1 "
        "(the best single global τ), the F1 under each rule, and the largest gap (points) between a site's kept "
        "share and its clean share under the mixture rule. Signals standardised and τ set against validation + "
        "anchors (the app) unless marked *anchors*.\n\n"
    )
    for name, seeds in data.items():
        kinds = list(next(iter(next(iter(seeds.values())).values()))["reference"]["by_kind"])
        rows = []
        for label in CANDIDATES:
            for reference in ("reference", "anchors"):
                cells = [seeds[s][label][reference] for s in seeds]
                rows.append(
                    [
                        label + (" *anchors*" if reference == "anchors" else ""),
                        f"{mean([c['auroc'] for c in cells]):.3f}",
                        f"{mean([c['best_f1'] for c in cells]):.1f}",
                        *(f"{mean([c[r]['f1'] for c in cells]):.1f}" for r in rule_labels),
                        f"{mean([max(map(abs, c['histogram (mixture)']['share_gap'])) for c in cells]):.1f}",
                        *(f"{mean([c['by_kind'][k] for c in cells]):.3f}" for k in kinds),
                    ]
                )
        table += f"### {name} {' '.join(f'{k}={v}' for k, v in settings[name].items())}\n\n"
        table += markdown_table(
            ["selection", "AUROC", "best-τ F1", *(f"F1 {r}" for r in rule_labels), "max share gap", *kinds], rows
        )
        table += "\n"
    print(table)
    write(
        Path(args.out),
        "selection_settings",
        "Candidate selections across settings and seeds (how the default was chosen)",
        command_line(__file__, argv),
        {"settings": settings, "seeds": args.seeds, "results": data, "seconds": round(time.time() - start, 1)},
        table,
    )


if __name__ == "__main__":
    main()

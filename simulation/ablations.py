"""Selection-level ablations of CLUES on the demo: scoring layer, number of anchors,
threshold rule and number of checkpoints, each judged by AUROC and P/R/F1 (positive = clean).

    python simulation/ablations.py                # ~3 minutes on 2 shared CPU cores
    python simulation/ablations.py --set demo-pool-size=1000 --set model-name=<hub model>   # a GPU

The setting is the app's run config (``--set`` overrides) and the trace the app's own
(``clues_flwr.harness.bench.prepare``), once per scoring layer in ``--layers`` (the trace is seeded,
so only the moments it keeps differ). Every ablation scores with the default variant (paper
preconditioning + cosine) at the first of ``--layers`` unless it varies that, and applies
``anchor-mean`` and ``anchor-quantile`` at each ``--recall``:

- layer: the first of ``--layers`` against the others (-1 = the last layer).
- anchors: τ from n anchors drawn at random ``--anchor-draws`` times from the clean public
  records outside the pools, the demo's 10 anchors and its public test split
  (run-config ``test-size``); τ, P, R and F1 as mean ± std over the draws, since few anchors make a
  noisy τ. The recall bound is the anchor-quantile guarantee 1 − k/(n + 1) of the τ used.
- rules: each rule with the app's clean reference (the 50 validation records and the 10
  anchors), with the score histogram.
- checkpoints: the first k checkpoints of the one trace. Training is seeded by round and
  site, so a prefix is exactly the trajectory a k-round trace would give.

Writes ``ablation_<name>.json``, ``.md`` and ``.png`` per ablation into ``--out``.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch

from clues_flwr.config import AppConfig
from clues_flwr.harness.bench import (
    DEFAULT,
    VARIANTS,
    anchors_as_reference,
    driver_arguments,
    driver_run_config,
    prepare,
    raw_gradients,
    reference_scores,
    rule_label,
    select,
    separation,
    variant_scores,
)
from clues_flwr.harness.results import command_line, figure, markdown_table, save_figure, score_histogram, write
from clues_flwr.model import cached

METRICS = ("tau", "precision", "recall", "f1", "accuracy")


def short(rule: str) -> str:
    return rule.replace("anchor-quantile ", "quantile\n")


def kept_share(row: dict, total: int) -> str:
    return f"{sum(row['kept'].values()) / total:.0%}"


def recall_bound(reference: torch.Tensor, row: dict) -> str:
    """1 − k/(n + 1) with τ the k-th smallest of n reference scores: the clean recall that
    anchor-quantile guarantees; below the target when there are too few of them."""
    if not row["rule"].startswith("anchor-quantile"):
        return "-"
    k = int((reference < row["tau"]).sum()) + 1
    return f"{1 - k / (reference.numel() + 1):.3f}"


def mean_std(rows: list[dict]) -> dict:
    """Mean and (population) std of each metric over anchor draws."""
    return {
        f"{m}_{stat}": float(fn([r[m] for r in rows]))
        for m in METRICS
        for stat, fn in (("mean", np.mean), ("std", np.std))
    }


def pm(row: dict, metric: str, fmt: str = ".1f") -> str:
    return f"{row[metric + '_mean']:{fmt}} ± {row[metric + '_std']:{fmt}}"


def selection_cells(row: dict, total: int) -> list:
    return [
        row["rule"],
        row["tau"],
        kept_share(row, total),
        *(f"{row[m]:.1f}" for m in ("precision", "recall", "f1", "accuracy")),
    ]


SELECTION_HEADER = ["rule", "τ", "kept", "P", "R", "F1", "Acc"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    driver_arguments(p)
    p.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[0, -1],
        help="scoring layers compared; the first scores the other ablations",
    )
    p.add_argument(
        "--recall", type=float, nargs="+", default=[0.3, 0.5, 0.8, 0.9], help="anchor-quantile target recalls"
    )
    p.add_argument("--anchor-counts", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--anchor-draws", type=int, default=10, help="random anchor sets per count")
    p.add_argument(
        "--checkpoints", type=int, nargs="+", default=[1, 2, 4], help="trajectory prefixes (at most --trace-rounds)"
    )
    args = p.parse_args(argv)
    run = driver_run_config(args)
    if max(args.checkpoints) > run["trace-rounds"]:
        p.error(f"--checkpoints {max(args.checkpoints)} exceeds trace-rounds {run['trace-rounds']}")

    start = time.time()
    command = command_line(__file__, argv)
    last = cached(AppConfig.from_run_config(run).model)[0].config.num_hidden_layers - 1
    layers = [last if layer == -1 else layer for layer in args.layers]
    benches = {layer: prepare({**run, "score-layer": layer}, args.nodes) for layer in layers}
    first = layers[0]
    bench = benches[first]
    candidates = bench.public["anchor"] + bench.public["test"]
    if max(args.anchor_counts) > len(candidates):
        p.error(f"--anchor-counts {max(args.anchor_counts)} exceeds the {len(candidates)} clean public records")
    print(f"traced {len(layers)} x {len(bench.trajectory)} checkpoints in {time.time() - start:.0f}s")
    raws = {
        layer: raw_gradients(b, {**b.sets(), "candidates": candidates} if layer == first else b.sets())
        for layer, b in benches.items()
    }
    print(
        f"per-sample gradients of {len(layers)} layers x {len(bench.trajectory)} checkpoints "
        f"in {time.time() - start:.0f}s"
    )
    cfg = VARIANTS[DEFAULT]
    names = bench.names
    rules = [("anchor-mean", None), *(("anchor-quantile", r) for r in args.recall)]
    clean = bench.clean
    total = sum(map(len, clean.values()))
    args.out.mkdir(parents=True, exist_ok=True)
    common = {"args": {k: str(v) for k, v in vars(args).items()}, "run_config": run, "variant": DEFAULT}
    cfg_run = bench.config
    setting = (
        f"{len(clean)} sites of {' / '.join(str(len(c)) for c in clean.values())} records polluted "
        f"{cfg_run.data.pollution}; {DEFAULT}, {cfg_run.selection.trace_rounds} checkpoints of "
        f"{cfg_run.train.local_steps} steps, scoring layer {first}, τ from the "
        f"{len(bench.public['validation']) + len(bench.public['anchor'])} clean reference records (validation + "
        "anchors) unless varied. Positive = clean.\n\n"
    )

    # Scoring layer.
    rows, aurocs = [], {}
    scores = {layer: variant_scores(raws[layer], b.trajectory, b.names, cfg) for layer, b in benches.items()}
    for layer, s in scores.items():
        label = str(layer) + {0: " (first)", last: " (last)"}.get(layer, "")
        aurocs[label] = separation(s, bench)
        rows += [{"layer": label, **select(s, clean, rule, bench.config.selection)} for rule in rules]
    table = setting + markdown_table(
        ["layer", "AUROC", *SELECTION_HEADER],
        [[r["layer"], f"{aurocs[r['layer']]['pooled']:.3f}", *selection_cells(r, total)] for r in rows],
    )
    fig, ax = figure()
    width = 0.8 / len(aurocs)
    x = np.arange(len(rules))
    for j, label in enumerate(aurocs):
        ax.bar(
            x + (j - (len(aurocs) - 1) / 2) * width,
            [r["f1"] for r in rows if r["layer"] == label],
            width,
            label=f"layer {label}, AUROC {aurocs[label]['pooled']:.3f}",
        )
    ax.set_xticks(x, [short(rule_label(r)) for r in rules], fontsize=7)
    ax.set(ylabel="F1 (%)", ylim=(0, 105), title="scoring layer")
    ax.legend(fontsize=7)
    plot = save_figure(fig, args.out / "ablation_layer.png")
    write(
        args.out,
        "ablation_layer",
        "Ablation: scoring layer",
        command,
        {**common, "rows": rows, "auroc": aurocs},
        table,
        [plot],
    )

    # Number of anchors, several random draws per count.
    s = scores[first]
    pool = s["candidates"]
    rows = []
    for n in args.anchor_counts:
        draws = [random.Random(seed).sample(range(len(candidates)), n) for seed in range(args.anchor_draws)]
        for rule in rules:
            picked = [
                {**select(anchors_as_reference(s, pool[idx]), clean, rule, bench.config.selection), "anchors": idx}
                for idx in draws
            ]
            bounds = {recall_bound(pool[r["anchors"]], r) for r in picked}
            rows.append(
                {
                    "anchors": n,
                    "rule": rule_label(rule),
                    "recall_bound": sorted(bounds),
                    **mean_std(picked),
                    "draws": picked,
                }
            )
    table = (
        setting
        + f"τ, P, R, F1: mean ± std over {args.anchor_draws} random draws of the anchors "
        + f"from {len(candidates)} clean public records.\n\n"
    )
    table += markdown_table(
        ["anchors", "rule", "recall bound", "τ", "P", "R", "F1", "Acc"],
        [
            [
                r["anchors"],
                r["rule"],
                ", ".join(r["recall_bound"]),
                pm(r, "tau", ".3g"),
                pm(r, "precision"),
                pm(r, "recall"),
                pm(r, "f1"),
                pm(r, "accuracy"),
            ]
            for r in rows
        ],
    )
    fig, axes = figure((14, 3.6), ncols=3)
    for rule in rules:
        mine = [r for r in rows if r["rule"] == rule_label(rule)]
        for ax, metric in zip(axes, ("f1", "recall", "tau")):
            ax.errorbar(
                args.anchor_counts,
                [r[f"{metric}_mean"] for r in mine],
                [r[f"{metric}_std"] for r in mine],
                marker="o",
                capsize=3,
                label=rule_label(rule),
            )
    for ax, ylabel in zip(axes, ("F1 (%)", "recall (%)", "τ")):
        ax.set(xscale="log", xlabel="anchors", ylabel=ylabel)
        ax.minorticks_off()
        ax.set_xticks(args.anchor_counts, [str(n) for n in args.anchor_counts])
    axes[0].legend(fontsize=7)
    plot = save_figure(fig, args.out / "ablation_anchors.png")
    write(
        args.out,
        "ablation_anchors",
        "Ablation: number of anchors",
        command,
        {**common, "candidates": len(candidates), "rows": rows},
        table,
        [plot],
    )

    # Threshold rule, with the app's clean reference.
    rows = [select(s, clean, rule, bench.config.selection) for rule in rules]
    table = setting + markdown_table(
        ["rule", "recall bound", "τ", "kept per client", "P", "R", "F1", "Acc"],
        [
            [
                r["rule"],
                recall_bound(reference_scores(s), r),
                r["tau"],
                " / ".join(map(str, r["kept"].values())),
                *(f"{r[m]:.1f}" for m in ("precision", "recall", "f1", "accuracy")),
            ]
            for r in rows
        ],
    )
    fig, (left, right) = figure((12, 3.6), ncols=2)
    score_histogram(
        left,
        s,
        bench.clean,
        {r["rule"]: r["tau"] for r in rows},
        f"{DEFAULT}, AUROC {separation(s, bench)['pooled']:.3f}",
    )
    left.legend(fontsize=7)
    x = np.arange(len(rows))
    for j, metric in enumerate(("precision", "recall", "f1")):
        right.bar(x + (j - 1) * 0.27, [r[metric] for r in rows], 0.27, label=metric)
    right.set_xticks(x, [short(r["rule"]) for r in rows], fontsize=7)
    right.set(ylabel="%", ylim=(0, 105), title="threshold rule")
    right.legend(fontsize=7)
    plot = save_figure(fig, args.out / "ablation_rules.png")
    write(args.out, "ablation_rules", "Ablation: threshold rule", command, {**common, "rows": rows}, table, [plot])

    # Number of checkpoints: prefixes of the one trace.
    rows, aurocs = [], {}
    for k in args.checkpoints:
        sk = variant_scores(raws[first][:k], bench.trajectory[:k], names, cfg)
        aurocs[k] = separation(sk, bench)
        rows += [{"checkpoints": k, **select(sk, clean, rule, bench.config.selection)} for rule in rules]
    table = setting + markdown_table(
        ["checkpoints", "AUROC", *SELECTION_HEADER],
        [[r["checkpoints"], f"{aurocs[r['checkpoints']]['pooled']:.3f}", *selection_cells(r, total)] for r in rows],
    )
    fig, (left, right) = figure((10, 3.6), ncols=2)
    left.plot(args.checkpoints, [aurocs[k]["pooled"] for k in args.checkpoints], "o-")
    left.set(xlabel="checkpoints", ylabel="AUROC pooled", xticks=args.checkpoints)
    for rule in rules:
        right.plot(
            args.checkpoints, [r["f1"] for r in rows if r["rule"] == rule_label(rule)], "o-", label=rule_label(rule)
        )
    right.set(xlabel="checkpoints", ylabel="F1 (%)", xticks=args.checkpoints)
    right.legend(fontsize=7)
    plot = save_figure(fig, args.out / "ablation_checkpoints.png")
    write(
        args.out,
        "ablation_checkpoints",
        "Ablation: number of checkpoints",
        command,
        {**common, "rows": rows, "auroc": {str(k): v for k, v in aurocs.items()}},
        table,
        [plot],
    )
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

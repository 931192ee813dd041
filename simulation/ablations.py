"""Selection-level ablations of CLUES on the demo: scoring layer, number of anchors,
threshold rule and number of checkpoints, each judged by AUROC and P/R/F1 (positive = clean).

    python simulation/ablations.py --threads 1    # ~1 minute on 2 shared CPU cores
    python simulation/ablations.py --pool-size 1000 --model-name <hub model> --quantization 4bit   # a GPU

Built on ``selection_table``'s machinery: one trace of ``--trace-rounds`` rounds keeps the
AdamW moments of every layer in ``--layers``, and one gradient pass per checkpoint captures
all those layers at once, so the ablations cost about one selection table. Every ablation
scores with the default variant (paper preconditioning + cosine) at the first of
``--layers`` unless it varies that, and applies ``anchor-mean`` and ``anchor-quantile`` at
each ``--recall``:

- layer: the first of ``--layers`` against the others (-1 = the last layer).
- anchors: τ from n anchors drawn at random ``--anchor-draws`` times from the clean public
  records outside the pools, the demo's 10 anchors and its public test split
  (``--test-size``); τ, P, R and F1 as mean ± std over the draws, since few anchors make a
  noisy τ. The recall bound is the anchor-quantile guarantee 1 − k/(n + 1) of the τ used.
- rules: the demo's 10 anchors under each rule, with the score histogram.
- checkpoints: the first k checkpoints of the one trace. Training is seeded by round and
  client, so a prefix is exactly the trajectory a k-round trace would give.

Writes ``ablation_<name>.json``, ``.md`` and ``.png`` per ablation into ``--out``.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from selection_table import (
    DEFAULT,
    VARIANTS,
    add_arguments,
    prepare,
    raw_gradients,
    rule_label,
    score_histogram,
    select,
    separation,
    variant_scores,
)

from clues_flwr.data import NUM_ANCHORS
from results import command_line, figure, markdown_table, save_figure, write

METRICS = ("tau", "precision", "recall", "f1", "accuracy")


def short(rule: str) -> str:
    return rule.replace("anchor-quantile ", "quantile\n")


def kept_share(row: dict, total: int) -> str:
    return f"{sum(row['kept'].values()) / total:.0%}"


def recall_bound(anchors: torch.Tensor, row: dict) -> str:
    """1 − k/(n + 1) with τ the k-th smallest of n anchor scores: the clean recall that
    anchor-quantile guarantees; below the target when there are too few anchors."""
    if not row["rule"].startswith("anchor-quantile"):
        return "-"
    k = int((anchors < row["tau"]).sum()) + 1
    return f"{1 - k / (anchors.numel() + 1):.3f}"


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
    add_arguments(p)
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
    if max(args.checkpoints) > args.trace_rounds:
        p.error(f"--checkpoints {max(args.checkpoints)} exceeds --trace-rounds {args.trace_rounds}")
    if max(args.anchor_counts) > NUM_ANCHORS + args.test_size:
        p.error(
            f"--anchor-counts {max(args.anchor_counts)} exceeds the {NUM_ANCHORS + args.test_size} "
            "clean public records (raise --test-size)"
        )

    start = time.time()
    command = command_line(__file__, argv)
    bench = prepare(args, args.layers)
    candidates = bench.splits.anchors + bench.splits.test
    print(f"traced {len(bench.trajectory)} checkpoints in {time.time() - start:.0f}s")
    every = [n for layer in args.layers for n in bench.names[layer]]
    raw = raw_gradients(bench, {**bench.sets(), "candidates": candidates}, every)
    print(f"per-sample gradients of {len(args.layers)} layers x {len(raw)} checkpoints in {time.time() - start:.0f}s")

    params = dict(bench.model.named_parameters())
    by_layer, col = {}, 0
    for layer in args.layers:
        width = sum(params[n].numel() for n in bench.names[layer])
        by_layer[layer] = [{k: g[:, col : col + width] for k, g in r.items()} for r in raw]
        col += width
    cfg = VARIANTS[DEFAULT]
    first = args.layers[0]
    names = bench.names[first]
    rules = [("anchor-mean", None), *(("anchor-quantile", r) for r in args.recall)]
    clean = bench.clean
    total = sum(map(len, clean.values()))
    last = bench.model.config.num_hidden_layers - 1
    args.out.mkdir(parents=True, exist_ok=True)
    common = {"args": {k: str(v) for k, v in vars(args).items()}, "variant": DEFAULT}
    setting = (
        f"{len(clean)} clients × {args.pool_size} records polluted {args.pollution}; {DEFAULT}, "
        f"{args.trace_rounds} checkpoints of {args.local_steps} steps, scoring layer {first}, the "
        f"{len(bench.splits.anchors)} demo anchors, unless varied. Positive = clean.\n\n"
    )

    # Scoring layer.
    rows, aurocs = [], {}
    scores = {
        layer: variant_scores(by_layer[layer], bench.trajectory, bench.names[layer], cfg) for layer in args.layers
    }
    for layer, s in scores.items():
        resolved = last if layer == -1 else layer
        label = str(resolved) + {0: " (first)", last: " (last)"}.get(resolved, "")
        aurocs[label] = separation(s, bench)
        rows += [{"layer": label, **select(s, clean, rule)} for rule in rules]
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
            picked = [{**select({**s, "anchors": pool[idx]}, clean, rule), "anchors": idx} for idx in draws]
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

    # Threshold rule, with the demo's anchors.
    rows = [select(s, clean, rule) for rule in rules]
    table = setting + markdown_table(
        ["rule", "recall bound", "τ", "kept per client", "P", "R", "F1", "Acc"],
        [
            [
                r["rule"],
                recall_bound(s["anchors"], r),
                r["tau"],
                " / ".join(map(str, r["kept"].values())),
                *(f"{r[m]:.1f}" for m in ("precision", "recall", "f1", "accuracy")),
            ]
            for r in rows
        ],
    )
    fig, (left, right) = figure((12, 3.6), ncols=2)
    score_histogram(
        left, s, bench, {r["rule"]: r["tau"] for r in rows}, f"{DEFAULT}, AUROC {separation(s, bench)['pooled']:.3f}"
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
        sk = variant_scores(by_layer[first][:k], bench.trajectory[:k], names, cfg)
        aurocs[k] = separation(sk, bench)
        rows += [{"checkpoints": k, **select(sk, clean, rule)} for rule in rules]
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

"""The paper's Table 3 on the demo: how well each CLUES variant and each baseline tells
clean from polluted records, under every threshold rule and a fixed keep ratio.

    python simulation/selection_table.py                       # ~2 minutes on 2 shared CPU cores
    python simulation/selection_table.py --set seed=1 --set demo-pool-size=1000
    python simulation/selection_table.py --set model-name=<hub model> --set quantization=4bit   # a GPU

The setting is the app's run config (``pyproject.toml`` defaults, ``--set`` overrides), and
the trajectory is traced by the app itself (``clues_flwr.harness.bench.prepare``): each site's
records are those its ClientApp holds, and the trace rounds are the app's FedAvg rounds with
the clients' scoring-layer AdamW moments averaged by examples. Raw per-sample gradients are
computed once per checkpoint and rescored by every variant.

Baselines score at the initial adapter, the pretrained model every site starts from, as
the app does; DataInf's direction comes from the public validation set. Random scores each
site and the anchors from their own seeds; the oracle is the upper bound.

Every method is thresholded the same ways: τ from its scores of the public anchors
(``anchor-mean``; ``anchor-quantile`` at each ``--recall``), or each site's top
``--keep-ratio``. Positive = clean. Writes ``selection_table.json``, ``.md`` and PNG plots
into ``--out``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from clues_flwr.config import SelectionConfig
from clues_flwr.harness.bench import (
    DEFAULT,
    VARIANTS,
    Bench,
    Rule,
    baseline_set_scores,
    combined_scores,
    driver_arguments,
    driver_run_config,
    prepare,
    raw_gradients,
    rule_label,
    select,
    separation,
    variant_scores,
)
from clues_flwr.harness.results import command_line, figure, markdown_table, save_figure, score_histogram, write

BASELINES = ("perplexity", "end-loss", "peak-loss", "head-loss", "ifd", "ira", "datainf", "random", "oracle")
APP_DEFAULT = "CLUES + perplexity + end + head + IFD (sum)"  # the app's default selection
# Combined scores: (rule, signals), each signal standardised by its mean and spread on the clean reference.
COMBINED = {
    "CLUES + perplexity (sum)": ("sum", (DEFAULT, "perplexity")),
    "CLUES + perplexity (min)": ("min", (DEFAULT, "perplexity")),
    "CLUES + IFD (sum)": ("sum", (DEFAULT, "ifd")),
    "perplexity + IFD (sum)": ("sum", ("perplexity", "ifd")),
    "perplexity + end + IFD (sum)": ("sum", ("perplexity", "end-loss", "ifd")),
    "perplexity + end + head + IFD (sum)": ("sum", ("perplexity", "end-loss", "head-loss", "ifd")),
    "perplexity + end + head + IFD (min)": ("min", ("perplexity", "end-loss", "head-loss", "ifd")),
    APP_DEFAULT: ("sum", (DEFAULT, "perplexity", "end-loss", "head-loss", "ifd")),
}


def setting(bench: Bench) -> str:
    """One sentence that says what was measured: sites, pollution, trace, scoring layer, anchors."""
    cfg = bench.config
    sizes = " / ".join(str(len(r)) for r in bench.sites.values())
    return (
        f"{len(bench.sites)} sites of {sizes} records polluted {cfg.data.pollution} (seed {cfg.data.seed}); "
        f"CLUES traced by the app: {cfg.selection.trace_rounds} rounds × {cfg.train.local_steps} steps, "
        f"scoring layer {cfg.score.layer}; τ from the {len(bench.public['anchor'])} anchors. "
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    driver_arguments(p)
    p.add_argument(
        "--recall",
        type=float,
        nargs="+",
        default=[0.5, 0.8, 0.9],
        help="anchor-quantile target recalls; the first is the plots' default rule",
    )
    p.add_argument("--keep-ratio", type=float, default=0.6, help="fixed share each client keeps (keep_top)")
    args = p.parse_args(argv)

    run = driver_run_config(args)
    start = time.time()
    bench = prepare(run, args.nodes)
    names = bench.names
    print(f"traced {len(bench.trajectory)} checkpoints in {time.time() - start:.0f}s")
    raw = raw_gradients(bench, bench.sets())
    print(
        f"per-sample gradients of {sum(map(len, bench.sets().values()))} records x {len(raw)} checkpoints "
        f"in {time.time() - start:.0f}s"
    )
    scores = {name: variant_scores(raw, bench.trajectory, names, cfg) for name, cfg in VARIANTS.items()}
    scores.update(baseline_set_scores(bench, list(BASELINES)))
    scores.update({name: combined_scores(scores, *how) for name, how in COMBINED.items()})
    print(f"scored {len(VARIANTS)} variants and {len(BASELINES)} baselines in {time.time() - start:.0f}s")

    rules: list[Rule] = [
        ("anchor-mean", None),
        *(("anchor-quantile", r) for r in args.recall),
        ("histogram", "mixture"),
        ("histogram", "valley"),
        ("keep-ratio", args.keep_ratio),
    ]
    rows = [
        {"method": m, **select(s, bench.clean, rule, bench.config.selection)}
        for m, s in scores.items()
        for rule in rules
    ]
    sep = {m: separation(s, bench) for m, s in scores.items()}

    table = setting(bench) + "Baselines at the initial adapter. Positive = clean.\n\n"
    table += markdown_table(
        [
            "method",
            "rule",
            "τ",
            f"kept per site (of {' / '.join(str(len(r)) for r in bench.sites.values())})",
            "P",
            "R",
            "F1",
            "Acc",
        ],
        [
            [
                r["method"],
                r["rule"],
                "-" if r["tau"] is None else r["tau"],
                " / ".join(map(str, r["kept"].values())),
                f"{r['precision']:.1f}",
                f"{r['recall']:.1f}",
                f"{r['f1']:.1f}",
                f"{r['accuracy']:.1f}",
            ]
            for r in rows
        ],
    )
    kinds = list(next(iter(sep.values()))["by_kind"])
    table += (
        "\nAUROC of clean over polluted, pooled, per client, and against each pollution kind; "
        "best F1 = the highest F1 of any one global τ (what a perfect threshold rule would reach):\n\n"
    )
    table += markdown_table(
        ["method", "pooled", "best F1", "per client", *kinds],
        [
            [
                m,
                f"{s['pooled']:.3f}",
                f"{s['best_f1']:.1f}",
                " / ".join(f"{v:.3f}" for v in s["per_client"].values()),
                *(f"{s['by_kind'][k]:.3f}" for k in kinds),
            ]
            for m, s in sep.items()
        ],
    )
    app_rule = rule_label((SelectionConfig.threshold_rule, SelectionConfig.histogram_fit))
    app_row = next(r for r in rows if r["method"] == APP_DEFAULT and r["rule"] == app_rule)
    table += (
        f"\nEach site's kept share against its clean share under the app's default ({APP_DEFAULT}, {app_rule}):\n\n"
    )
    table += markdown_table(
        ["site", "records", "clean share", "kept share", "difference (points)"],
        [
            [
                site,
                len(truth),
                f"{100 * sum(truth) / len(truth):.1f}",
                f"{100 * app_row['kept'][site] / len(truth):.1f}",
                f"{100 * (app_row['kept'][site] - sum(truth)) / len(truth):+.1f}",
            ]
            for site, truth in bench.clean.items()
        ],
    )
    print("\n" + table)

    args.out.mkdir(parents=True, exist_ok=True)
    methods = list(scores)
    fig, (left, right) = figure((15, 4.2), ncols=2)
    width = 0.8 / len(rules)
    x = np.arange(len(methods))
    for j, rule in enumerate(rules):
        f1 = [r["f1"] for r in rows if r["rule"] == rule_label(rule)]
        left.bar(x + (j - (len(rules) - 1) / 2) * width, f1, width, label=rule_label(rule))
    left.set(ylabel="F1 (%)", title="F1 per method and rule", ylim=(0, 105))
    default = app_rule
    picked = [r for r in rows if r["rule"] == default]
    for j, metric in enumerate(("precision", "recall", "f1")):
        right.bar(x + (j - 1) * 0.27, [r[metric] for r in picked], 0.27, label=metric)
    right.set(ylabel="%", title=f"under {default}", ylim=(0, 105))
    for ax in (left, right):
        ax.set_xticks(x, [m.replace("CLUES ", "CLUES\n") for m in methods], rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=7, ncols=2)
    plots = [save_figure(fig, args.out / "selection_table_f1.png")]
    for name, group in (("clues", list(VARIANTS)), ("baselines", list(BASELINES)), ("combined", list(COMBINED))):
        fig, axes = figure((2.6 * len(group), 2.8), ncols=len(group))
        for ax, m in zip(axes, group):
            taus = {r["rule"]: r["tau"] for r in rows if r["method"] == m and r["rule"] in ("anchor-mean", default)}
            score_histogram(ax, scores[m], bench.clean, taus, f"{m}\nAUROC {sep[m]['pooled']:.3f}")
        axes[0].legend(fontsize=7)
        plots.append(save_figure(fig, args.out / f"selection_table_hist_{name}.png"))

    command = command_line(__file__, argv)
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "run_config": run,
        "seconds": round(time.time() - start, 1),
        "rows": rows,
        "auroc": sep,
    }
    write(
        args.out,
        "selection_table",
        "Selection quality per method and rule (paper Table 3)",
        command,
        data,
        table,
        plots,
    )
    print(f"done in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()

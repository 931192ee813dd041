"""The paper's Table 3 on the demo: how well each CLUES variant and each baseline tells
clean from polluted records, under every threshold rule and a fixed keep ratio.
(This script was ``selection_check.py``; ``ablations.py`` imports its machinery.)

    python simulation/selection_table.py --threads 1  # ~1 minute on 2 shared CPU cores
    python simulation/selection_table.py --pool-size 1000 --model-name <hub model> --quantization 4bit   # a GPU

CLUES: a global trajectory is traced in process the way the federation does it: every
trace round each client trains from the global adapter, the adapters are averaged by
examples (FedAvg) and so are the clients' scoring-layer AdamW moments; each round's
global adapter with the averaged moments and the learning rate is a checkpoint. Raw
per-sample gradients are computed once per checkpoint and shared by every variant.

Baselines score at the initial adapter, the pretrained model every site starts from, as
the pipeline does; DataInf's direction comes from the public validation set. Random
scores each client and the anchors from their own seeds; the oracle is the upper bound.

Every method is thresholded the same ways: τ from its scores of the 10 public anchors
(``anchor-mean``; ``anchor-quantile`` at each ``--recall``), or each client's top
``--keep-ratio`` (``keep_top``). Positive = clean. Writes ``selection_table.json``,
``.md`` and PNG plots into ``--out`` through ``results.write``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clues_flwr.aggregation import fedavg
from clues_flwr.baselines import baseline_scores, datainf_direction, keep_top
from clues_flwr.combine import combine, standardise
from clues_flwr.data import DemoSplits, Record, demo_splits, parse_ratios
from clues_flwr.metrics import auroc, best_f1, confusion, selection_scores
from clues_flwr.model import ModelSpec, adapter_state, build, load_tokenizer, set_adapter_state
from clues_flwr.pollution import HIGH
from clues_flwr.scoring import ScoreConfig, gamma_from_grads, gammas, scoring_names, threshold
from clues_flwr.train import TrainConfig, train_steps, training
from clues_flwr.trajectory import Checkpoint, moments
from results import command_line, figure, markdown_table, save_figure, write

DEFAULT = "CLUES paper + cosine (default)"
VARIANTS = {
    DEFAULT: ScoreConfig(),
    "CLUES paper (eqs. 5-8)": ScoreConfig.paper(),
    "CLUES official code": ScoreConfig.official(),
    "CLUES official + cosine": ScoreConfig(
        precondition="adam-eps-inside", bias_correction=False, precondition_validation=False
    ),
    "CLUES sgd": ScoreConfig(precondition="sgd", cosine=False),
    "CLUES sgd + cosine": ScoreConfig(precondition="sgd"),
}
BASELINES = ("perplexity", "ifd", "datainf", "random", "oracle")
# Combined scores: (rule, signals), each signal standardised against its anchor scores.
COMBINED = {
    "CLUES + perplexity (sum)": ("sum", (DEFAULT, "perplexity")),
    "CLUES + perplexity (min)": ("min", (DEFAULT, "perplexity")),
    "CLUES + IFD (sum)": ("sum", (DEFAULT, "ifd")),
    "perplexity + IFD (sum)": ("sum", ("perplexity", "ifd")),
}

# A rule is (name, value): ("anchor-mean", None), ("anchor-quantile", recall) or ("keep-ratio", ratio).
Rule = tuple[str, float | None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo, trace and model flags both drivers share."""
    p.add_argument("--pool-size", type=int, default=240, help="records per client")
    p.add_argument("--pollution", default="0.8,0.2,0.1,0.5", help="one ratio per client")
    p.add_argument("--trace-rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--model-name", default=":demo:")
    p.add_argument("--quantization", default="8bit")
    p.add_argument("--test-size", type=int, default=200, help="the public test split (clean records outside the pools)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trace-optimizer",
        choices=("reset", "keep"),
        default="reset",
        help="a fresh AdamW per client per trace round, or one kept across rounds",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); 1 is fastest on shared cores"
    )
    p.add_argument("--out", type=Path, default=Path("results"))


@dataclass
class Bench:
    """The demo split, the model at its initial adapter, the traced trajectory, and the truth."""

    args: argparse.Namespace
    splits: DemoSplits
    model: object
    tok: object
    initial: dict[str, torch.Tensor]
    names: dict[int, list[str]]
    trajectory: list[Checkpoint]

    def sets(self) -> dict[str, list[Record]]:
        sets = {"validation": self.splits.validation, "anchors": self.splits.anchors}
        sets.update({f"client{i}": pool for i, pool in enumerate(self.splits.pools)})
        return sets

    @property
    def clean(self) -> dict[str, list[bool]]:
        return {f"client{i}": [r["quality"] == "high" for r in pool] for i, pool in enumerate(self.splits.pools)}

    @property
    def kinds(self) -> list[str]:
        return [r["pollution"] for pool in self.splits.pools for r in pool]


def trace(model, tok, pools, rounds, steps, batch_size, lr, max_len, names, keep_optimizer=False) -> list[Checkpoint]:
    """Global trajectory: FedAvg of adapters and of the scoring layers' moments per round.
    ``keep_optimizer``: each client carries its AdamW state from round to round instead
    of starting a fresh one (the moments then span every round the client trained)."""
    global_adapter = adapter_state(model)
    optimizers = [None] * len(pools)
    trajectory = []
    for rnd in range(1, rounds + 1):
        adapters, ms, vs, taken = [], [], [], []
        for i, pool in enumerate(pools):
            set_adapter_state(model, global_adapter)
            _, opt = train_steps(
                training(model, tok, pool, batch_size, lr, max_len, seed=1009 * rnd + i, optimizer=optimizers[i]), steps
            )
            if keep_optimizer:
                optimizers[i] = opt
            m, v, step = moments(model, opt, names)
            adapters.append(adapter_state(model))
            ms.append(m)
            vs.append(v)
            taken.append(step)
        weights = [len(p) for p in pools]
        global_adapter = fedavg(adapters, weights)
        trajectory.append(
            Checkpoint(
                adapter=global_adapter,
                exp_avg=fedavg(ms, weights),
                exp_avg_sq=fedavg(vs, weights),
                step=max(taken),
                lr=lr,
                weight_decay=TrainConfig.weight_decay,
                round=rnd,
            )
        )
    return trajectory


def prepare(args: argparse.Namespace, layers: list[int]) -> Bench:
    """Split, build, and trace once, keeping the moments of every scoring layer in ``layers``
    (-1 = the last), so one trajectory serves them all."""
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = parse_ratios(args.pollution)
    splits = demo_splits(len(ratios), args.pool_size, ratios, test_size=args.test_size, seed=args.seed)
    model = build(ModelSpec(name=args.model_name, quantization=args.quantization, seed=args.seed))
    tok = load_tokenizer(args.model_name)
    last = model.config.num_hidden_layers - 1
    names = {layer: scoring_names(model, last if layer == -1 else layer) for layer in layers}
    initial = adapter_state(model)
    every = sorted({n for ns in names.values() for n in ns})
    trajectory = trace(
        model,
        tok,
        splits.pools,
        args.trace_rounds,
        args.local_steps,
        args.batch_size,
        args.lr,
        args.max_len,
        every,
        keep_optimizer=args.trace_optimizer == "keep",
    )
    return Bench(args, splits, model, tok, initial, names, trajectory)


def raw_gradients(bench: Bench, sets: dict[str, list[Record]], names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per checkpoint, the raw per-sample gradients [N, d] of every set: the expensive part,
    done once and rescored by every variant."""
    cfg = ScoreConfig(batch_size=bench.args.batch_size, max_len=bench.args.max_len, cosine=False)
    return [
        {k: gammas(bench.model, bench.tok, recs, c, names, cfg, raw=True) for k, recs in sets.items()}
        for c in bench.trajectory
    ]


def variant_scores(raw, trajectory, names, cfg) -> dict[str, torch.Tensor]:
    """S for every set from the cached raw gradients, under one variant; a shorter
    ``trajectory`` scores with its checkpoints only."""
    total = {k: 0.0 for k in raw[0] if k != "validation"}
    for ckpt, grads in zip(trajectory, raw):
        raw_val = not cfg.precondition_validation
        g_val = gamma_from_grads(grads["validation"], ckpt, names, cfg, raw_val).sum(0).double()
        for key in total:
            total[key] = total[key] + ckpt.lr * (gamma_from_grads(grads[key], ckpt, names, cfg).double() @ g_val)
    return {k: v.cpu() for k, v in total.items()}


def baseline_set_scores(bench: Bench, method: str) -> dict[str, torch.Tensor]:
    """A baseline's scores of the anchors and of every client at the initial adapter."""
    args = bench.args
    set_adapter_state(bench.model, bench.initial)
    sizes = {"batch_size": args.batch_size, "max_len": args.max_len}
    direction = (
        datainf_direction(bench.model, bench.tok, bench.splits.validation, **sizes) if method == "datainf" else None
    )
    sets = {k: v for k, v in bench.sets().items() if k != "validation"}
    sets["anchors"] = [
        {**r, "quality": HIGH} for r in sets["anchors"]
    ]  # public and clean by construction: the oracle's 1
    return {
        k: baseline_scores(method, bench.model, bench.tok, recs, seed=args.seed + j, direction=direction, **sizes)
        for j, (k, recs) in enumerate(sets.items())
    }


def combined_scores(scores: dict[str, dict[str, torch.Tensor]], rule: str, signals: tuple[str, ...]) -> dict:
    """Every set's combined score from ``signals``, each standardised against its anchors."""
    return {
        key: combine([standardise(scores[m][key], scores[m]["anchors"]) for m in signals], rule)
        for key in scores[signals[0]]
    }


def rule_label(rule: Rule) -> str:
    name, value = rule
    if name == "anchor-quantile":
        return f"anchor-quantile r={value:g}"
    return f"keep {value:.0%}" if name == "keep-ratio" else name


def select(scores: dict[str, torch.Tensor], clean: dict[str, list[bool]], rule: Rule) -> dict:
    """Each client's keep mask under ``rule``; confusion counts add up across clients."""
    name, value = rule
    tau = None if name == "keep-ratio" else threshold(scores["anchors"], name, value)
    counts = dict.fromkeys(("tp", "fp", "fn", "tn"), 0)
    kept = {}
    for k, truth in clean.items():
        keep = keep_top(scores[k], value) if name == "keep-ratio" else scores[k] >= tau
        c = confusion(keep.tolist(), truth)
        counts = {x: counts[x] + c[x] for x in counts}
        kept[k] = c["tp"] + c["fp"]
    return {"rule": rule_label(rule), "tau": tau, "kept": kept, "counts": counts, **selection_scores(counts)}


def separation(scores: dict[str, torch.Tensor], bench: Bench) -> dict:
    """AUROC of clean over polluted: pooled over clients, per client, and per pollution
    kind; and the best F1 any one global τ could reach with these scores."""
    clean = bench.clean
    pooled = torch.cat([scores[k] for k in clean]).tolist()
    truth = [c for k in clean for c in clean[k]]
    kinds = bench.kinds
    return {
        "pooled": auroc(pooled, truth),
        "best_f1": best_f1(pooled, truth),
        "per_client": {k: auroc(scores[k].tolist(), clean[k]) for k in clean},
        "by_kind": {
            kind: auroc(*zip(*[(s, c) for s, c, kd in zip(pooled, truth, kinds) if c or kd == kind]))
            for kind in sorted(set(kinds) - {"none"})
        },
    }


def score_histogram(ax, scores: dict[str, torch.Tensor], bench: Bench, taus: dict[str, float], title: str) -> None:
    """Clean and polluted scores pooled over clients, with each τ as a vertical line."""
    clean = bench.clean
    pooled = torch.cat([scores[k] for k in clean]).numpy()
    truth = np.array([c for k in clean for c in clean[k]])
    edges = np.histogram_bin_edges(pooled, bins=30)
    ax.hist(pooled[truth], bins=edges, alpha=0.6, label="clean")
    ax.hist(pooled[~truth], bins=edges, alpha=0.6, label="polluted")
    for i, (label, tau) in enumerate(taus.items()):
        ax.axvline(tau, color=f"C{i + 2}", linestyle="--", label=f"τ {label}")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("score (higher = keep)", fontsize=8)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--layer", type=int, default=0, help="CLUES scoring layer (-1 = last)")
    p.add_argument(
        "--recall",
        type=float,
        nargs="+",
        default=[0.5, 0.8, 0.9],
        help="anchor-quantile target recalls; the first is the plots' default rule",
    )
    p.add_argument("--keep-ratio", type=float, default=0.6, help="fixed share each client keeps (keep_top)")
    args = p.parse_args(argv)

    start = time.time()
    bench = prepare(args, [args.layer])
    names = bench.names[args.layer]
    print(f"traced {len(bench.trajectory)} checkpoints in {time.time() - start:.0f}s")
    raw = raw_gradients(bench, bench.sets(), names)
    print(
        f"per-sample gradients of {sum(map(len, bench.sets().values()))} records x {len(raw)} checkpoints "
        f"in {time.time() - start:.0f}s"
    )
    scores = {name: variant_scores(raw, bench.trajectory, names, cfg) for name, cfg in VARIANTS.items()}
    scores.update({m: baseline_set_scores(bench, m) for m in BASELINES})
    scores.update({name: combined_scores(scores, *how) for name, how in COMBINED.items()})
    print(f"scored {len(VARIANTS)} variants and {len(BASELINES)} baselines in {time.time() - start:.0f}s")

    rules: list[Rule] = [
        ("anchor-mean", None),
        *(("anchor-quantile", r) for r in args.recall),
        ("keep-ratio", args.keep_ratio),
    ]
    rows = [{"method": m, **select(s, bench.clean, rule)} for m, s in scores.items() for rule in rules]
    sep = {m: separation(s, bench) for m, s in scores.items()}

    n = len(bench.splits.pools[0])
    table = (
        f"{len(bench.splits.pools)} clients × {n} records polluted {args.pollution}; CLUES traced "
        f"{args.trace_rounds} rounds × {args.local_steps} steps, scoring layer {args.layer}; baselines at the "
        f"initial adapter. Positive = clean; τ from the {len(bench.splits.anchors)} anchors.\n\n"
    )
    table += markdown_table(
        ["method", "rule", "τ", f"kept per client (of {n})", "P", "R", "F1", "Acc"],
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
    default = rule_label(rules[1])
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
            score_histogram(ax, scores[m], bench, taus, f"{m}\nAUROC {sep[m]['pooled']:.3f}")
        axes[0].legend(fontsize=7)
        plots.append(save_figure(fig, args.out / f"selection_table_hist_{name}.png"))

    command = command_line(__file__, argv)
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
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

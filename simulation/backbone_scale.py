"""Does CLUES's ranking sharpen with a bigger backbone? Pretrains the demo backbone at each
``--sizes`` (hidden × layers) and scores the same demo split with CLUES (the app's default
variant) and with perplexity, the baseline that wins on the 1M demo.

    python simulation/backbone_scale.py --sizes 128x4                        # the shipped size, ~5 min on a CPU
    python simulation/backbone_scale.py --sizes 128x4,512x8,1024x12 --device cuda --pretrain-steps 20000

The paper's ranking claims come from a 7B model; on the 1M demo CLUES separates clean from
polluted records with AUROC 0.88 and perplexity with 0.99. This driver measures the trend
in between. Backbones are built once into ``--backbones`` (a folder per size, reused when
its ``pretrain.json`` matches) by ``clues_flwr.harness.pretrain``, so a GPU can build the big ones
and a CPU can score them. Writes ``backbone_scale.json``, ``.md`` and a plot into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from clues_flwr.harness.bench import (
    DEFAULT,
    VARIANTS,
    baseline_set_scores,
    driver_arguments,
    driver_run_config,
    prepare,
    raw_gradients,
    select,
    separation,
    variant_scores,
)
from clues_flwr.harness.pretrain import attention_heads, pretrain
from clues_flwr.harness.results import command_line, figure, markdown_table, save_figure, write


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"128x4,512x8"`` -> [(128, 4), (512, 8)], with an error naming the flag."""
    try:
        sizes = [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s.strip()]
        if not sizes or any(len(s) != 2 or s[1] <= 0 for s in sizes):
            raise ValueError("a size is not hidden x layers")
        for hidden, _ in sizes:
            attention_heads(hidden)
    except ValueError as err:
        raise ValueError(f"--sizes: expected hidden x layers pairs like 128x4,512x8, got {text!r} ({err})") from err
    return sizes


def backbone(folder: Path, hidden: int, layers: int, args: argparse.Namespace, seed: int) -> dict:
    """Pretrain into ``folder`` unless a backbone built with these settings is there; its
    ``pretrain.json``."""
    wanted = {
        "hidden_size": hidden,
        "layers": layers,
        "steps": args.pretrain_steps,
        "all_facts": not args.unread_facts,
        "seed": seed,
        "lr": args.pretrain_lr,
    }
    info_file = folder / "pretrain.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if all(info.get(k) == v for k, v in wanted.items()):
            return info
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"pretraining {hidden}x{layers} for {args.pretrain_steps} steps on {args.device}")
    return pretrain(
        folder,
        args.pretrain_steps,
        32,
        args.pretrain_lr,
        seed,
        args.threads or 2,
        0.25,
        hidden_size=hidden,
        layers=layers,
        all_facts=not args.unread_facts,
        device=args.device,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    driver_arguments(p)
    p.add_argument("--sizes", default="128x4,192x4", help="hidden x layers, comma-separated; hidden a multiple of 32")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument(
        "--unread-facts", action="store_true", help="backbones that have read only the pretraining half of the facts"
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where backbones are pretrained: cpu or cuda (scoring uses CUDA whenever present)",
    )
    p.add_argument(
        "--backbones",
        type=Path,
        default=Path("runs/backbones"),
        help="folder of the built backbones, reused across runs",
    )
    p.add_argument(
        "--recall", type=float, default=0.5, help="the anchor-quantile rule's target recall (the app's default)"
    )
    args = p.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    run = driver_run_config(args)

    start, rows = time.time(), []
    for hidden, layers in sizes:
        folder = args.backbones / f"{hidden}x{layers}{'-unread' if args.unread_facts else ''}-s{args.pretrain_steps}"
        info = backbone(folder, hidden, layers, args, run["seed"])
        bench = prepare({**run, "model-name": str(folder)}, args.nodes)
        raw = raw_gradients(bench, bench.sets())
        scores = {
            "CLUES": variant_scores(raw, bench.trajectory, bench.names, VARIANTS[DEFAULT]),
            "perplexity": baseline_set_scores(bench, ["perplexity"])["perplexity"],
        }
        row = {"size": f"{hidden}x{layers}", "parameters": info["parameters"], "pretrain_loss": info["final_loss"]}
        for method, s in scores.items():
            sep, chosen = (
                separation(s, bench),
                select(s, bench.clean, ("anchor-quantile", args.recall), bench.config.selection),
            )
            row[method] = {
                "auroc": sep["pooled"],
                "best_f1": sep["best_f1"],
                "f1": chosen["f1"],
                "by_kind": sep["by_kind"],
            }
        rows.append(row)
        print(
            f"{row['size']}: CLUES AUROC {row['CLUES']['auroc']:.3f}, "
            f"perplexity {row['perplexity']['auroc']:.3f} ({time.time() - start:.0f}s)"
        )

    rule = f"anchor-quantile r={args.recall:g}"
    table = (
        f"Demo backbones pretrained {args.pretrain_steps} steps "
        f"on {'half' if args.unread_facts else 'all'} of the facts; "
        f"{bench.config.data.pollution} pollution, {bench.config.data.demo_pool_size} records per site, "
        f"trace {bench.config.selection.trace_rounds} rounds. "
        f"CLUES is the default variant (Adam + cosine, first layer); F1 under {rule}.\n\n"
    )
    table += markdown_table(
        [
            "backbone",
            "parameters",
            "pretrain loss",
            "CLUES AUROC",
            "CLUES best F1",
            f"CLUES F1 ({rule})",
            "PPL AUROC",
            "PPL best F1",
            f"PPL F1 ({rule})",
        ],
        [
            [
                r["size"],
                f"{r['parameters'] / 1e6:.1f}M",
                f"{r['pretrain_loss']:.3f}",
                *(
                    f"{r[m][k]:.3f}" if k == "auroc" else f"{r[m][k]:.1f}"
                    for m in ("CLUES", "perplexity")
                    for k in ("auroc", "best_f1", "f1")
                ),
            ]
            for r in rows
        ],
    )
    print("\n" + table)
    fig, ax = figure((5.5, 3.4))
    params = [r["parameters"] for r in rows]
    for method in ("CLUES", "perplexity"):
        ax.plot(params, [r[method]["auroc"] for r in rows], marker="o", label=method)
    ax.set(
        xscale="log",
        xlabel="backbone parameters",
        ylabel="AUROC (clean over polluted)",
        title="Ranking against backbone size",
    )
    ax.legend()
    args.out.mkdir(parents=True, exist_ok=True)
    plot = save_figure(fig, args.out / "backbone_scale.png")
    data = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "run_config": run,
        "seconds": round(time.time() - start, 1),
        "rows": rows,
    }
    write(
        args.out, "backbone_scale", "Ranking against backbone size", command_line(__file__, argv), data, table, [plot]
    )


if __name__ == "__main__":
    main()

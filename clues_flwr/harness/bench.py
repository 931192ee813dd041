"""Selection benchmarks on the app's own runs, shared by the drivers under ``simulation/``.

``prepare`` builds what a run of the app would: the run config (the app's defaults and
``--set`` overrides), the model, the public sets, each demo site's records as its
ClientApp holds them, and the trajectory traced by the app's own ``CluesSelection.trace``
and ``CluesClient`` handlers on an in-process grid, so a driver's trace is the app's (same
seeds, same averaging). Scoring then caches raw per-sample gradients once per checkpoint
and rescores them under every variant, rule and combination. ``federation`` runs the whole
app (selection and tuning) for the downstream tables.
"""

from __future__ import annotations

import dataclasses
import json
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord

from clues_flwr.config import AppConfig, SelectionConfig
from clues_flwr.core.adapter import set_adapter_state
from clues_flwr.core.combine import combined, references
from clues_flwr.core.data import Record
from clues_flwr.core.metrics import auroc, best_f1, confusion, selection_scores
from clues_flwr.core.pollution import HIGH
from clues_flwr.core.scoring import ScoreConfig, along, gamma_from_grads, gammas, left_out, scoring_names
from clues_flwr.core.signals import datainf_direction, scores_by_signal
from clues_flwr.core.threshold import global_threshold, histogram, keep, standard
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.demo import client_app
from clues_flwr.demo.server_app import run_clues
from clues_flwr.demo.task import local_split, public_sets
from clues_flwr.flower.selection import CluesSelection
from clues_flwr.harness.local_grid import LocalGrid, app_defaults, demo_nodes
from clues_flwr.model import cached, initial_adapter

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
# A rule is (name, value): ("anchor-mean", None), ("anchor-quantile", recall), ("keep-ratio", ratio)
# or ("histogram", fit).
Rule = tuple[str, float | str | None]


def parse_set(items: list[str]) -> dict:
    """``key=value`` pairs with TOML values (``8``, ``0.5``, ``"ties"`` or bare ``ties``)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def run_config(overrides: dict, **more) -> dict:
    """The app's run-config defaults with ``overrides``; unknown keys stop the driver."""
    defaults = app_defaults()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise SystemExit(f"unknown run-config keys: {', '.join(unknown)}")
    return {**defaults, **overrides, **more}


@dataclass
class Bench:
    """One run's selection problem: the sites' records (labelled), the public sets, the
    model at its initial adapter and the app's trajectory."""

    config: AppConfig
    model: Any
    tokenizer: Any
    initial: dict[str, torch.Tensor]
    public: dict[str, list[Record]]
    sites: dict[str, list[Record]]
    trajectory: list[Checkpoint]
    names: list[str]

    def sets(self) -> dict[str, list[Record]]:
        """Every set a score is needed for: validation, anchors and each site."""
        return {"validation": self.public["validation"], "anchors": self.public["anchor"], **self.sites}

    @property
    def clean(self) -> dict[str, list[bool]]:
        return {k: [r["quality"] == HIGH for r in recs] for k, recs in self.sites.items()}

    @property
    def kinds(self) -> list[str]:
        return [r["pollution"] for recs in self.sites.values() for r in recs]


def prepare(run: dict, nodes: int) -> Bench:
    """The app's selection problem for the run config ``run`` on ``nodes`` demo sites,
    traced by the app itself (no trace for ``selection`` other than ``clues``)."""
    cfg = AppConfig.from_run_config(run)
    model, tokenizer = cached(cfg.model)
    public = public_sets(cfg.data)
    grid = LocalGrid(client_app.app, demo_nodes(nodes), run)
    sites = {f"client{i}": local_split(ctx)[0] for i, ctx in enumerate(grid.contexts.values())}
    initial = initial_adapter(cfg.model)
    stage = CluesSelection.from_records(
        model,
        tokenizer,
        public["validation"],
        public["anchor"],
        score=cfg.score,
        selection=dataclasses.replace(cfg.selection, selection="clues"),
        train=cfg.train,
        federation=dataclasses.replace(cfg.federation, min_available_nodes=nodes, min_train_nodes=nodes),
    )
    trajectory = stage.trace(grid, ArrayRecord(initial))[None]
    set_adapter_state(model, initial)
    names = scoring_names(model, cfg.score)
    return Bench(cfg, model, tokenizer, initial, public, sites, trajectory, names)


def raw_gradients(bench: Bench, sets: dict[str, list[Record]]) -> list[dict[str, torch.Tensor]]:
    """Per checkpoint, the raw per-sample gradients [N, d] of every set: the expensive part,
    done once and rescored by every variant."""
    cfg, max_len = dataclasses.replace(bench.config.score, cosine=False), bench.config.train.max_seq_len
    return [
        {
            k: gammas(bench.model, bench.tokenizer, recs, c, bench.names, cfg, max_len, raw=True)
            for k, recs in sets.items()
        }
        for c in bench.trajectory
    ]


def variant_scores(raw, trajectory, names, cfg: ScoreConfig) -> dict[str, torch.Tensor]:
    """S for every set from the cached raw gradients, under one variant, the validation
    records' with each left out of G_t (``scoring.left_out_scores``); a shorter
    ``trajectory`` scores with its checkpoints only."""
    val_sides = [
        gamma_from_grads(grads["validation"], ckpt, names, cfg, not cfg.precondition_validation).double()
        for ckpt, grads in zip(trajectory, raw)
    ]

    def aligned(key: str):
        for ckpt, grads, val_side in zip(trajectory, raw, val_sides):
            gamma = gamma_from_grads(grads[key], ckpt, names, cfg).double()
            yield left_out(gamma, val_side) if key == "validation" else gamma @ val_side.sum(0)

    return {key: along(trajectory, aligned(key)) for key in raw[0]}


def baseline_set_scores(bench: Bench, signals: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each baseline signal's scores of the public sets and of every site at the initial
    adapter, as the app scores them; DataInf's direction from the public validation set."""
    score, max_len = bench.config.score, bench.config.train.max_seq_len
    set_adapter_state(bench.model, bench.initial)
    val = bench.public["validation"]
    direction = (
        datainf_direction(bench.model, bench.tokenizer, val, batch_size=score.batch_size, max_len=max_len)
        if "datainf" in signals
        else None
    )
    sets = bench.sets()
    for public in ("validation", "anchors"):  # public and clean: the oracle's 1
        sets[public] = [{**r, "quality": HIGH} for r in sets[public]]
    seed = bench.config.train.seed
    by_set = {
        k: scores_by_signal(
            signals,
            bench.model,
            bench.tokenizer,
            recs,
            score,
            max_len,
            adapter=bench.initial,
            direction=direction,
            seed=seed + j,
        )
        for j, (k, recs) in enumerate(sets.items())
    }
    return {m: {k: by_set[k][m] for k in sets} for m in signals}


def reference_scores(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The clean reference's scores, as ``Reference.records`` orders it."""
    return torch.cat([scores["validation"], scores["anchors"]])


def anchors_as_reference(scores: dict[str, torch.Tensor], anchors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The scores with ``anchors`` as the whole clean reference (no validation records): how
    the app stood before the larger reference, or a drawn count of clean records alone."""
    return {**scores, "validation": scores["validation"][:0], "anchors": anchors}


def combined_scores(scores: dict[str, dict[str, torch.Tensor]], rule: str, signals: tuple[str, ...]) -> dict:
    """Every set's combined score from ``signals``, each standardised by its reference mean
    and spread (``core.combine``, as the app scores)."""
    stats = references({m: reference_scores(scores[m]) for m in signals})
    return {key: combined({m: scores[m][key] for m in signals}, stats, rule) for key in scores[signals[0]]}


def rule_label(rule: Rule) -> str:
    name, value = rule
    if name == "anchor-quantile":
        return f"anchor-quantile r={value:g}"
    if name == "histogram":
        return f"histogram ({value})"
    return f"keep {value:.0%}" if name == "keep-ratio" else name


def select(scores: dict, clean: dict[str, list[bool]], rule: Rule, selection: SelectionConfig) -> dict:
    """Each site's keep mask under ``rule``, by the app's own functions (``core.threshold``):
    the histogram rule sees only each site's histogram over ``selection``'s bins and falls
    back as the app does. Confusion counts add up across sites."""
    name, value = rule
    fixed = dataclasses.replace(
        selection,
        keep_ratio=value if name == "keep-ratio" else 0.0,
        threshold_rule=selection.threshold_rule if name == "keep-ratio" else name,
        histogram_fit=value if name == "histogram" else selection.histogram_fit,
        target_recall=value if name == "anchor-quantile" else selection.target_recall,
    )
    held = standard(scores["anchors"], reference_scores(scores), fixed.rule, fixed.target_recall, fixed.histogram_bins)
    histograms = [histogram(scores[k].tolist(), held.edges) for k in clean] if held.edges else []
    tau, _, _ = global_threshold(held, histograms, fixed.rule, fixed.histogram_fit, fixed.target_recall)
    counts = dict.fromkeys(("tp", "fp", "fn", "tn"), 0)
    kept = {}
    for k, truth in clean.items():
        c = confusion(keep(scores[k], tau, fixed.keep_ratio).tolist(), truth)
        counts = {x: counts[x] + c[x] for x in counts}
        kept[k] = c["tp"] + c["fp"]
    return {"rule": rule_label(rule), "tau": tau, "kept": kept, "counts": counts, **selection_scores(counts)}


def separation(scores: dict[str, torch.Tensor], bench: Bench) -> dict:
    """AUROC of clean over polluted: pooled over sites, per site, and per pollution kind;
    and the best F1 any one global τ could reach with these scores."""
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


def federation(run: dict, nodes: int) -> dict:
    """The whole app (selection and tuning) on the in-process grid: final test loss and
    accuracy, the loss per round and, when there was a score phase, the selection's
    P/R/F1/accuracy and τ."""
    start = time.time()
    folder = run_clues(LocalGrid(client_app.app, demo_nodes(nodes), run), run)
    rounds = json.loads((folder / "metrics.json").read_text())["rounds"]
    row = {
        "selection": run["selection"],
        "test-loss": rounds[-1]["test-loss"],
        "test-accuracy": rounds[-1]["test-accuracy"],
        "loss-per-round": [r["test-loss"] for r in rounds],
        "seconds": round(time.time() - start, 1),
        "run": str(folder),
    }
    if (folder / "selection.json").exists():
        sel = json.loads((folder / "selection.json").read_text())
        row.update({k: sel.get(k) for k in ("precision", "recall", "f1", "accuracy")})
        row["threshold"] = next(iter(sel["clients"].values()))["threshold"]
    return row


def recovery(rows: list[dict], method: str) -> float | None:
    """(loss_none − loss_method) / (loss_none − loss_oracle), when all three ran."""
    by = {r["selection"]: r["test-loss"] for r in rows}
    if {"none", method, "oracle"} <= set(by) and by["none"] != by["oracle"]:
        return (by["none"] - by[method]) / (by["none"] - by["oracle"])
    return None


def driver_arguments(parser) -> None:
    """The flags every driver shares: run-config overrides, sites, threads, output."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    parser.add_argument("--nodes", type=int, default=4, help="demo sites (one per pollution ratio)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0 = torch's default); 1 is fastest on shared cores"
    )
    parser.add_argument("--out", type=Path, default=Path("results"))


def driver_run_config(args) -> dict:
    """The run config a driver's flags describe; sets the thread count first."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_config(parse_set(args.set))

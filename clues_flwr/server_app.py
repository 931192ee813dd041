"""ServerApp: reads the run config, runs the CLUES strategy, writes the run folder."""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clues_flwr.baselines import baseline_scores, datainf_direction
from clues_flwr.data import Record, parse_names
from clues_flwr.metrics import answer_accuracy, eval_loss
from clues_flwr.model import ModelSpec, cached, initial_adapter, resolve_model_name, set_adapter_state
from clues_flwr.partition import splits_for
from clues_flwr.report import finish_run, open_run, per_round, resumable
from clues_flwr.scoring import ScoreConfig, anchor_scores
from clues_flwr.sources import load_records
from clues_flwr.strategy import CluesStrategy, say

app = ServerApp()
# Keys a resumed run may change: how far to go, and where the run folder was looked up.
RESUME_FREE = ("num-server-rounds", "resume-from", "output-dir")


def public_sets(run) -> dict[str, list[Record]]:
    """Validation, anchors and test: the ``*-path`` sources where given, else those split
    off the run's ``dataset`` (or the demo) exactly as the clients split it."""
    split = splits_for(run, num_clients=0)
    defaults = {"validation": split.validation, "anchor": split.anchors, "test": split.test}
    return {name: load_records(str(run[f"{name}-path"])) if run[f"{name}-path"] else records for name, records in defaults.items()}


def score_config(run) -> ScoreConfig:
    return ScoreConfig(
        layer=int(run["score-layer"]),
        modules=parse_names(str(run["score-modules"])),
        precondition=str(run["precondition"]),
        bias_correction=bool(run["bias-correction"]),
        precondition_validation=bool(run["precondition-validation"]),
        cosine=bool(run["cosine"]),
        batch_size=int(run["score-batch-size"]),
        max_len=int(run["max-seq-len"]),
    )


def round_timeout(run) -> float:
    """Seconds each phase waits for the sites' replies; a site still silent then is left
    out of that round and named, as a site that is offline is."""
    seconds = float(run["round-timeout"])
    if not seconds > 0:
        raise ValueError(f"round-timeout must be a positive number of seconds, got {run['round-timeout']!r}")
    return seconds


def strategy_from(run, score_anchors, score_baseline=None) -> CluesStrategy:
    min_train = int(run["min-train-nodes"])
    return CluesStrategy(
        score_anchors=score_anchors,
        score_config=score_config(run),
        mode=str(run["mode"]),
        selection=str(run["selection"]),
        trace_rounds=int(run["trace-rounds"]),
        threshold_rule=str(run["threshold-rule"]),
        target_recall=float(run["target-recall"]),
        aggregation=str(run["aggregation"]),
        ties_density=float(run["ties-density"]),
        local_epochs=int(run["local-epochs"]),
        histogram_bins=int(run["histogram-bins"]),
        keep_ratio=float(run["keep-ratio"]),
        score_baseline=score_baseline,
        fraction_train=float(run["fraction-train"]),
        fraction_evaluate=float(run["fraction-evaluate"]),
        min_train_nodes=min_train,
        min_evaluate_nodes=min_train,
        min_available_nodes=int(run["min-available-nodes"]),
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_clues(grid, context.run_config, context.run_id)


def run_clues(grid: Grid, run, run_id: int = 0) -> Path:
    """The whole run on any grid (Flower's, or ``LocalGrid`` in drivers); the run folder."""
    timeout = round_timeout(run)
    spec = ModelSpec.from_config(run)
    model, tokenizer = cached(spec)
    public = public_sets(run)
    cfg = score_config(run)
    batch_size = int(run["batch-size"])

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter_state(model, arrays.to_torch_state_dict())
        loss = eval_loss(model, tokenizer, public["test"], batch_size, cfg.max_len)
        accuracy = answer_accuracy(model, tokenizer, public["test"], 4 * batch_size, int(run["max-new-tokens"]))
        say(f"round {server_round}: test loss {loss:.4f}, test accuracy {accuracy:.3f}")
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    def score_baseline(method: str, adapter: dict) -> tuple:
        set_adapter_state(model, adapter)
        sizes = {"batch_size": cfg.batch_size, "max_len": cfg.max_len}
        direction = datainf_direction(model, tokenizer, public["validation"], **sizes) if method == "datainf" else None
        return baseline_scores(method, model, tokenizer, public["anchor"], seed=int(run["seed"]), direction=direction, **sizes), direction

    strategy = strategy_from(
        run, functools.partial(anchor_scores, model, tokenizer, public["validation"], public["anchor"], cfg=cfg), score_baseline
    )
    config = {"run_config": dict(run), "base_model": resolve_model_name(str(run["model-name"]))}
    if run["resume-from"]:
        run_dir = resumable(Path(str(run["resume-from"])).expanduser().resolve(), config, RESUME_FREE)
    else:
        run_dir = open_run(Path(str(run["output-dir"])).expanduser().resolve(), run_id, config)
    train_config = ConfigRecord(
        {
            "lr": float(run["learning-rate"]),
            "weight-decay": float(run["weight-decay"]),
            "local-steps": int(run["local-steps"]),
            "batch-size": batch_size,
            "max-seq-len": cfg.max_len,
            "seed": int(run["seed"]),
        }
    )
    initial = ArrayRecord(initial_adapter(spec))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(run["num-server-rounds"]),
        timeout=timeout,
        train_config=train_config,
        evaluate_fn=central_evaluate,
        run_dir=run_dir,
    )
    if not result.arrays:
        say("no tuning round produced an aggregate: the run folder keeps the initial adapter")
    set_adapter_state(model, (result.arrays or initial).to_torch_state_dict())
    rounds = per_round(result.train_metrics_clientapp, result.evaluate_metrics_clientapp, result.evaluate_metrics_serverapp)
    run_dir = finish_run(run_dir, model, rounds, strategy.report)
    say("per-round metrics:")
    for row in rounds:
        say("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if strategy.report["failures"]:
        say(f"{len(strategy.report['failures'])} failure(s): " + "; ".join(f"{f['where']} node {f['node']}: {f['reason']}" for f in strategy.report["failures"]))
    say(f"run folder: {run_dir}")
    return run_dir

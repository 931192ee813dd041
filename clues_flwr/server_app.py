"""ServerApp: reads the run config, runs the CLUES strategy, writes the run folder."""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clues_flwr.baselines import baseline_scores, datainf_direction
from clues_flwr.config import AppConfig, DataConfig
from clues_flwr.data import Record
from clues_flwr.metrics import answer_accuracy, eval_loss
from clues_flwr.model import cached, initial_adapter, resolve_model_name, set_adapter_state
from clues_flwr.partition import splits_for
from clues_flwr.report import finish_run, open_run, per_round, resumable
from clues_flwr.scoring import anchor_scores
from clues_flwr.sources import load_records
from clues_flwr.strategy import CluesStrategy, say

app = ServerApp()
# Keys a resumed run may change: how far to go, and where the run folder was looked up.
RESUME_FREE = ("num-server-rounds", "resume-from", "output-dir")


def public_sets(data: DataConfig) -> dict[str, list[Record]]:
    """Validation, anchors and test: the ``*-path`` sources where given, else those split
    off the run's ``dataset`` (or the demo) exactly as the clients split it."""
    split = splits_for(data, num_clients=0)
    defaults = {"validation": split.validation, "anchor": split.anchors, "test": split.test}
    paths = {"validation": data.validation_path, "anchor": data.anchor_path, "test": data.test_path}
    return {name: load_records(paths[name]) if paths[name] else records for name, records in defaults.items()}


def strategy_from(cfg: AppConfig, score_anchors, score_baseline=None) -> CluesStrategy:
    fed = cfg.federation
    return CluesStrategy(
        score_anchors=score_anchors,
        score_config=cfg.score,
        selection=cfg.selection,
        tune=cfg.tune,
        train=cfg.train,
        score_baseline=score_baseline,
        fraction_train=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_train_nodes=fed.min_train_nodes,
        min_evaluate_nodes=fed.min_train_nodes,
        min_available_nodes=fed.min_available_nodes,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_clues(grid, context.run_config, context.run_id)


def run_clues(grid: Grid, run, run_id: int = 0) -> Path:
    """The whole run on any grid (Flower's, or ``LocalGrid`` in drivers); the run folder.
    Every setting is checked, and the public sets read, before the run folder exists."""
    cfg = AppConfig.from_run_config(run)
    model, tokenizer = cached(cfg.model)
    public = public_sets(cfg.data)
    score, train = cfg.score, cfg.train

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter_state(model, arrays.to_torch_state_dict())
        loss = eval_loss(model, tokenizer, public["test"], train.batch_size, score.max_len)
        accuracy = answer_accuracy(model, tokenizer, public["test"], 4 * train.batch_size, cfg.output.max_new_tokens)
        say(f"round {server_round}: test loss {loss:.4f}, test accuracy {accuracy:.3f}")
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    def score_baseline(method: str, adapter: dict) -> tuple:
        set_adapter_state(model, adapter)
        sizes = {"batch_size": score.batch_size, "max_len": score.max_len}
        direction = datainf_direction(model, tokenizer, public["validation"], **sizes) if method == "datainf" else None
        return baseline_scores(
            method, model, tokenizer, public["anchor"], seed=cfg.data.seed, direction=direction, **sizes
        ), direction

    strategy = strategy_from(
        cfg,
        functools.partial(anchor_scores, model, tokenizer, public["validation"], public["anchor"], cfg=score),
        score_baseline,
    )
    config = {"run_config": dict(run), "base_model": resolve_model_name(cfg.model.name)}
    if cfg.output.resume_from:
        run_dir = resumable(Path(cfg.output.resume_from).expanduser().resolve(), config, RESUME_FREE)
    else:
        run_dir = open_run(Path(cfg.output.output_dir).expanduser().resolve(), run_id, config)
    initial = ArrayRecord(initial_adapter(cfg.model))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=cfg.tune.num_server_rounds,
        timeout=cfg.federation.round_timeout,
        evaluate_fn=central_evaluate,
        run_dir=run_dir,
    )
    if not result.arrays:
        say("no tuning round produced an aggregate: the run folder keeps the initial adapter")
    set_adapter_state(model, (result.arrays or initial).to_torch_state_dict())
    rounds = per_round(
        result.train_metrics_clientapp, result.evaluate_metrics_clientapp, result.evaluate_metrics_serverapp
    )
    run_dir = finish_run(run_dir, model, rounds, strategy.report)
    say("per-round metrics:")
    for row in rounds:
        say("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if strategy.report["failures"]:
        say(
            f"{len(strategy.report['failures'])} failure(s): "
            + "; ".join(f"{f['where']} node {f['node']}: {f['reason']}" for f in strategy.report["failures"])
        )
    say(f"run folder: {run_dir}")
    return run_dir

"""ServerApp: reads the run config, runs the CLUES strategy, writes the run folder."""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clues_flwr.config import AppConfig, DataConfig, to_record
from clues_flwr.data import Record
from clues_flwr.log import say
from clues_flwr.metrics import answer_accuracy, eval_loss
from clues_flwr.model import cached, initial_adapter, resolve_model_name, set_adapter_state
from clues_flwr.partition import splits_for
from clues_flwr.report import finish_run, per_round
from clues_flwr.resume import RoundHook, Start
from clues_flwr.selection import CluesSelection, SelectionReport
from clues_flwr.sources import load_records
from clues_flwr.strategy import CluesTuning, tuning_strategy
from clues_flwr.threads import limit_threads

app = ServerApp()


def public_sets(data: DataConfig) -> dict[str, list[Record]]:
    """Validation, anchors and test: the ``*-path`` sources where given, else those split
    off the run's ``dataset`` (or the demo) exactly as the clients split it."""
    split = splits_for(data, num_clients=0)
    defaults = {"validation": split.validation, "anchor": split.anchors, "test": split.test}
    paths = {"validation": data.validation_path, "anchor": data.anchor_path, "test": data.test_path}
    return {name: load_records(paths[name]) if paths[name] else records for name, records in defaults.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_clues(grid, context.run_config, context.run_id)


def run_clues(grid: Grid, run, run_id: int = 0) -> Path:
    """The whole run on any grid (Flower's, or ``LocalGrid`` in drivers); the run folder.
    Every setting is checked, and the public sets read, before the run folder exists."""
    limit_threads()
    cfg = AppConfig.from_run_config(run)
    model, tokenizer = cached(cfg.model)
    public = public_sets(cfg.data)
    fed = cfg.federation
    start = Start.open(cfg.output, {"run_config": dict(run), "base_model": resolve_model_name(cfg.model.name)}, run_id)
    initial = ArrayRecord(initial_adapter(cfg.model))
    last = 1 if cfg.tune.mode == "merge" else cfg.tune.num_server_rounds
    report = SelectionReport.from_state(start.saved["report"], cfg.selection) if start.saved else None
    public_info = start.saved.get("public") if start.saved else None
    if cfg.selection.method not in ("none", "oracle") and start.first_round <= last:
        selection = CluesSelection.from_public(
            model,
            tokenizer,
            public["validation"],
            public["anchor"],
            seed=cfg.data.seed,
            score_config=cfg.score,
            selection=cfg.selection,
            train=cfg.train,
            mode=cfg.tune.mode,
            min_available_nodes=fed.min_available_nodes,
            min_train_nodes=fed.min_train_nodes,
            fraction_train=fed.fraction_train,
            timeout=fed.round_timeout,
        )
        report = selection.run(grid, initial, start.store if cfg.tune.mode == "federated" else None)
        public_info = selection.public_info
    report = report or SelectionReport.of(cfg.selection)

    strategy = CluesTuning(
        tuning_strategy(
            cfg.tune.aggregation,
            cfg.tune.ties_density,
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=fed.min_train_nodes,
            min_evaluate_nodes=fed.min_train_nodes,
            min_available_nodes=fed.min_available_nodes,
        ),
        report,
        first_round=start.first_round,
        evaluate_every=cfg.output.evaluate_every,
        last_round=last,
    )
    saved_history = start.history()
    for name, metrics in strategy.history.items():
        metrics.update(saved_history.get(name, {}))
    hook = RoundHook(
        start,
        functools.partial(central_evaluate, model, tokenizer, public["test"], cfg),
        strategy.history,
        lambda: {"public": public_info, "report": report.to_state()},
        last,
        cfg.output.evaluate_every,
        cfg.output.save_every,
    )
    arrays = start.adapter(initial)
    tune_config = ConfigRecord({**to_record(cfg.train), "mode": cfg.tune.mode})
    rounds = max(last - start.first_round + 1, 0)
    result = strategy.start(grid, arrays, rounds, fed.round_timeout, tune_config, evaluate_fn=hook)
    if rounds and not result.arrays:
        say("no tuning round produced an aggregate: the run folder keeps the adapter it started from")
    set_adapter_state(model, (result.arrays or arrays).to_torch_state_dict())
    table = per_round(*strategy.history.values(), hook.server)
    run_dir = finish_run(start.run_dir, model, table, report.to_state())
    say("per-round metrics:")
    for row in table:
        say("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if report.failures:
        say(
            f"{len(report.failures)} failure(s): "
            + "; ".join(f"{f['where']} node {f['node']}: {f['reason']}" for f in report.failures)
        )
    say(f"run folder: {run_dir}")
    return run_dir


def central_evaluate(model, tokenizer, test: list[Record], cfg: AppConfig, server_round: int, arrays: ArrayRecord):
    """Test loss and exact-match accuracy of the global adapter on the public test set."""
    set_adapter_state(model, arrays.to_torch_state_dict())
    loss = eval_loss(model, tokenizer, test, cfg.train.batch_size, cfg.score.max_len)
    accuracy = answer_accuracy(model, tokenizer, test, 4 * cfg.train.batch_size, cfg.output.max_new_tokens)
    say(f"round {server_round}: test loss {loss:.4f}, test accuracy {accuracy:.3f}")
    return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

"""ServerApp: reads the run config, runs the CLUES strategy, writes the run folder."""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from clues_flwr.config import AppConfig, DataConfig, to_record
from clues_flwr.data import Record
from clues_flwr.log import say
from clues_flwr.metrics import answer_accuracy, eval_loss
from clues_flwr.model import cached, initial_adapter, resolve_model_name, set_adapter_state
from clues_flwr.partition import splits_for
from clues_flwr.report import finish_run, open_run, per_round, resumable
from clues_flwr.resume import RunState
from clues_flwr.selection import CluesSelection, SelectionReport
from clues_flwr.sources import load_records
from clues_flwr.strategy import CluesTuning, tuning_strategy

app = ServerApp()
# Keys a resumed run may change: how far to go, and where the run folder was looked up.
RESUME_FREE = ("num-server-rounds", "resume-from", "output-dir")
SERVER = "evaluate_metrics_serverapp"  # the central evaluation, named as in Flower's Result


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

    fed = cfg.federation
    config = {"run_config": dict(run), "base_model": resolve_model_name(cfg.model.name)}
    if cfg.output.resume_from:
        run_dir = resumable(Path(cfg.output.resume_from).expanduser().resolve(), config, RESUME_FREE)
    else:
        run_dir = open_run(Path(cfg.output.output_dir).expanduser().resolve(), run_id, config)
    store = RunState(run_dir)
    saved = store.load()
    initial = ArrayRecord(initial_adapter(cfg.model))
    rounds = 1 if cfg.tune.mode == "merge" else cfg.tune.num_server_rounds
    first = saved["round"] + 1 if saved and saved.get("adapter") else 1
    if saved:
        say(f"resume: {run_dir} stands after tuning round {saved['round']}")

    public_info = saved.get("public") if saved else None
    if cfg.selection.method in ("none", "oracle") or first > rounds:
        report = (
            SelectionReport.from_state(saved["report"], cfg.selection) if saved else SelectionReport.of(cfg.selection)
        )
    else:
        selection = CluesSelection.from_public(
            model,
            tokenizer,
            public["validation"],
            public["anchor"],
            seed=cfg.data.seed,
            score_config=score,
            selection=cfg.selection,
            train=train,
            mode=cfg.tune.mode,
            min_available_nodes=fed.min_available_nodes,
            min_train_nodes=fed.min_train_nodes,
            fraction_train=fed.fraction_train,
            timeout=fed.round_timeout,
        )
        report = selection.run(grid, initial, store if cfg.tune.mode == "federated" else None)
        public_info = selection.public_info

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
        first_round=first,
    )
    history = history_from(saved["history"]) if first > 1 else {}
    for name, metrics in strategy.history.items():
        metrics.update(history.get(name, {}))
    server_metrics = history.get(SERVER, {})
    arrays = ArrayRecord(saved["adapter"]) if first > 1 else initial

    def after_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's per-round hook: central evaluation, then the run state for a resume."""
        server_round = flower_round + first - 1
        if flower_round == 0 and first > 1:
            return None  # the adapter a resumed run starts from was evaluated before the stop
        metrics = server_metrics[server_round] = central_evaluate(server_round, arrays)
        if flower_round > 0:
            state = {"round": server_round, "public": public_info, "report": report.to_state()}
            state["history"] = history_json(strategy.history, server_metrics)
            store.save(state, arrays.to_torch_state_dict())
        return metrics

    tune_config = ConfigRecord({**to_record(train), "mode": cfg.tune.mode})
    result = strategy.start(
        grid, arrays, max(rounds - first + 1, 0), fed.round_timeout, tune_config, evaluate_fn=after_round
    )
    final = result.arrays or arrays
    if first <= rounds and not result.arrays:
        say("no tuning round produced an aggregate: the run folder keeps the adapter it started from")
    set_adapter_state(model, final.to_torch_state_dict())
    table = per_round(*strategy.history.values(), server_metrics)
    run_dir = finish_run(run_dir, model, table, report.to_state())
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


def history_json(history: dict[str, dict[int, MetricRecord]], server: dict[int, MetricRecord]) -> dict:
    """The metrics so far, per round, as the run state keeps them."""
    rows = {**history, SERVER: server}
    return {name: {str(r): dict(m) for r, m in per.items()} for name, per in rows.items()}


def history_from(saved: dict) -> dict[str, dict[int, MetricRecord]]:
    return {name: {int(r): MetricRecord(m) for r, m in per.items()} for name, per in saved.items()}

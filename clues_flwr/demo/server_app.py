"""The demo's ServerApp: CLUES selection in front of the configured strategy, a run folder."""

from __future__ import annotations

import functools
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from clues_flwr.config import AppConfig, to_record
from clues_flwr.core.adapter import set_adapter_state
from clues_flwr.core.data import check_max_len
from clues_flwr.demo.state import RoundHook, RunFolder
from clues_flwr.demo.task import central_evaluate, public_sets
from clues_flwr.demo.threads import limit_threads
from clues_flwr.demo.timing import TimedTuning
from clues_flwr.flower.exchange import wait_for_nodes
from clues_flwr.flower.log import say
from clues_flwr.flower.report import SelectionReport
from clues_flwr.flower.selection import CluesSelection
from clues_flwr.flower.tuning import tuning_strategy
from clues_flwr.model import cached, initial_adapter, resolve_model_name

app = ServerApp()


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
    check_max_len(public["validation"], tokenizer, cfg.train.max_seq_len)
    wait_for_nodes(grid, cfg.federation.min_available_nodes, cfg.federation.round_timeout)
    folder = RunFolder.open(cfg, run, resolve_model_name(cfg.model.name), run_id)
    rounds = folder.rounds(cfg)
    initial = ArrayRecord(initial_adapter(cfg.model))
    report = SelectionReport.of(cfg.selection, folder.saved.report if folder.saved else None)
    saved = folder.saved.reference if folder.saved else None
    sections = {"score": cfg.score, "selection": cfg.selection, "train": cfg.train, "tune": cfg.tune}
    if cfg.selection.selection not in ("none", "oracle") and rounds.first <= rounds.last:
        stage = CluesSelection.from_records(
            model, tokenizer, public["validation"], public["anchor"], federation=cfg.federation, **sections
        )
        federated = cfg.tune.mode == "federated"  # merge mode's trajectories are each site's own
        resume = folder.reference_scores() if federated else None
        report = stage.run(
            grid, initial, report=report, resume=resume, on_trace=folder.keep_trace if federated else None
        )
        saved = stage.reference_scores.state() if stage.reference_scores else None

    strategy = TimedTuning(
        tuning_strategy(cfg.tune, cfg.federation),
        report,
        first_round=rounds.first,
        evaluate_due=lambda true_round: rounds.due(true_round, rounds.evaluate_every),
        on_metrics=rounds.record,
    )
    evaluate = functools.partial(central_evaluate, model, tokenizer, public["test"], cfg)
    hook = RoundHook(folder, rounds, evaluate, lambda: (saved, report.to_state()))
    arrays = ArrayRecord(folder.saved.adapter) if rounds.first > 1 else initial
    count = max(rounds.last - rounds.first + 1, 0)
    config = ConfigRecord({**to_record(cfg.train), "mode": cfg.tune.mode})
    result = strategy.start(grid, arrays, count, cfg.federation.round_timeout, config, evaluate_fn=hook)
    set_adapter_state(model, (result.arrays or arrays).to_torch_state_dict())
    run_dir = folder.finish(model, rounds, report.to_state())
    say("per-round metrics:")
    for row in rounds.table():
        say("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if report.failures:
        say(
            f"{len(report.failures)} failure(s): "
            + "; ".join(f"{f['where']} {f.get('site', f['node'])}: {f['reason']}" for f in report.failures)
        )
    say(f"run folder: {run_dir}")
    return run_dir

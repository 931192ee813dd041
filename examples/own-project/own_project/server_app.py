"""The project's ServerApp: CLUES selection, then its own FedProx through Flower's loop."""

from __future__ import annotations

from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedProx

from clues_flwr import CluesSelection, CluesTuning, SelectionConfig, TrainConfig, adapter_arrays
from own_project.task import load_model, sums

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context):
    run = context.run_config
    model, tokenizer = load_model()
    validation, anchors = sums(30, seed=1000), sums(10, seed=1001)  # public and clean
    initial = adapter_arrays(model)
    selection = CluesSelection.from_records(
        model,
        tokenizer,
        validation,
        anchors,
        selection=SelectionConfig(selection="clues+perplexity", trace_rounds=int(run["trace-rounds"])),
        train=TrainConfig(
            learning_rate=float(run["learning-rate"]),
            local_steps=int(run["local-steps"]),
            batch_size=8,
            max_seq_len=48,  # their records are short: traced, scored and tuned on the same 48 tokens
        ),
    )
    report = selection.run(grid, initial)
    log(INFO, "CLUES kept %s", {n: f"{c['kept']}/{c['total']}" for n, c in report.clients.items()})
    strategy = CluesTuning(FedProx(proximal_mu=float(run["proximal-mu"]), fraction_evaluate=0.0), report)
    result = strategy.start(grid, initial, num_rounds=int(run["num-server-rounds"]))
    return report, result

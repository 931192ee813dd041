"""ServerApp: FedAvg over the LoRA adapter, centralized evaluation on the public test set,
and a run folder with the final adapter (PEFT format) and the per-round metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from clues_flwr.data import Record, demo_splits, load_jsonl
from clues_flwr.metrics import answer_accuracy, eval_loss
from clues_flwr.model import ModelSpec, adapter_state, cached, resolve_model_name, set_adapter_state

app = ServerApp()


def public_test(run) -> list[Record]:
    """The public test set: ``test-path`` when given, else the demo's."""
    if run["test-path"]:
        return load_jsonl(str(run["test-path"]))
    return demo_splits(num_clients=0, test_size=int(run["test-size"]), seed=int(run["seed"])).test


def per_round(result) -> list[dict]:
    """One row per round (0 = before training) joining client and server metrics."""
    rows: dict[int, dict] = {}
    for source in (
        result.train_metrics_clientapp,
        result.evaluate_metrics_clientapp,
        result.evaluate_metrics_serverapp,
    ):
        for rnd, record in source.items():
            rows.setdefault(rnd, {"round": rnd}).update(
                {k: v for k, v in record.items() if k != "num-examples"}
            )
    return [rows[r] for r in sorted(rows)]


def write_run(out_dir: Path, run_id: int, model, run, rounds: list[dict]) -> Path:
    """Stage the run folder and rename it into place, so no half-written run remains."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}"
    staging = final.with_name(final.name + ".partial")
    model.save_pretrained(staging / "adapter")
    config = {"run_config": dict(run), "base_model": resolve_model_name(str(run["model-name"]))}
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / "metrics.json").write_text(json.dumps({"rounds": rounds}, indent=2) + "\n")
    staging.rename(final)
    return final


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = context.run_config
    model, tokenizer = cached(ModelSpec.from_config(run))
    test = public_test(run)
    batch_size, max_len = int(run["batch-size"]), int(run["max-seq-len"])

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_adapter_state(model, arrays.to_torch_state_dict())
        loss = eval_loss(model, tokenizer, test, batch_size, max_len)
        accuracy = answer_accuracy(model, tokenizer, test, 4 * batch_size, int(run["max-new-tokens"]))
        print(f"[clues] round {server_round}: test loss {loss:.4f}, test accuracy {accuracy:.3f}", flush=True)
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    min_nodes = int(run["min-nodes"])
    strategy = FedAvg(
        fraction_train=float(run["fraction-train"]),
        fraction_evaluate=float(run["fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
    )
    initial = ArrayRecord(adapter_state(model))
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(run["num-server-rounds"]),
        evaluate_fn=central_evaluate,
    )
    if not result.arrays:
        print("[clues] no round produced an aggregate: the run folder keeps the initial adapter", flush=True)
    set_adapter_state(model, (result.arrays or initial).to_torch_state_dict())
    rounds = per_round(result)
    run_dir = write_run(Path(str(run["output-dir"])).expanduser().resolve(), context.run_id, model, run, rounds)
    print("[clues] per-round metrics:", flush=True)
    for row in rounds:
        print("[clues]   " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    print(f"[clues] run folder: {run_dir}", flush=True)

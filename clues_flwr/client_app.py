"""ClientApp: local LoRA training and held-out evaluation on a site's own records."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clues_flwr.data import Record, demo_splits, load_jsonl, parse_ratios, split_heldout
from clues_flwr.metrics import eval_loss
from clues_flwr.model import ModelSpec, adapter_state, cached, set_adapter_state
from clues_flwr.train import train_steps

app = ClientApp()


def site_records(context: Context) -> list[Record]:
    """The site's private records: its ``data-path`` JSONL file when the node config
    names one, else its demo pool chosen by ``partition-id`` (simulation)."""
    node, run = context.node_config, context.run_config
    if node.get("data-path"):
        return load_jsonl(str(node["data-path"]))
    if "partition-id" not in node:
        raise ValueError(
            "node config has neither data-path nor partition-id: start the SuperNode with "
            "--node-config 'data-path=\"/path/to/site.jsonl\"'"
        )
    splits = demo_splits(
        num_clients=int(node["num-partitions"]),
        pool_size=int(run["demo-pool-size"]),
        pollution_ratios=parse_ratios(str(run["demo-pollution"])),
        test_size=int(run["test-size"]),
        seed=int(run["seed"]),
    )
    return splits.pools[int(node["partition-id"])]


def local_split(context: Context) -> tuple[list[Record], list[Record]]:
    """(train, held-out) of this site, the same in every round."""
    run = context.run_config
    return split_heldout(site_records(context), float(run["heldout-fraction"]), int(run["seed"]))


def _model_with(msg: Message, context: Context):
    model, tokenizer = cached(ModelSpec.from_config(context.run_config))
    set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    return model, tokenizer


@app.train()
def train(msg: Message, context: Context) -> Message:
    run = context.run_config
    model, tokenizer = _model_with(msg, context)
    records, _ = local_split(context)
    server_round = int(msg.content["config"]["server-round"])
    losses, _ = train_steps(
        model,
        tokenizer,
        records,
        steps=int(run["local-steps"]),
        batch_size=int(run["batch-size"]),
        lr=float(run["learning-rate"]),
        max_len=int(run["max-seq-len"]),
        seed=int(run["seed"]) + 1009 * server_round,
    )
    metrics = MetricRecord({"train-loss": sum(losses) / len(losses), "num-examples": len(records)})
    content = RecordDict({"arrays": ArrayRecord(adapter_state(model)), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    run = context.run_config
    model, tokenizer = _model_with(msg, context)
    _, heldout = local_split(context)
    loss = eval_loss(model, tokenizer, heldout, int(run["batch-size"]), int(run["max-seq-len"]))
    metrics = MetricRecord({"eval-loss": loss, "num-examples": len(heldout)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

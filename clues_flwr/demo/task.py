"""The demo's own pieces, as a Flower example's ``task.py``: the model, each site's records
(built once per process), the public sets and the central evaluation."""

from __future__ import annotations

import functools
import json

from flwr.app import ArrayRecord, Context, MetricRecord

from clues_flwr.config import AppConfig, DataConfig, from_mapping
from clues_flwr.core.adapter import set_adapter_state
from clues_flwr.core.data import Record, split_heldout
from clues_flwr.core.metrics import answer_accuracy, eval_loss
from clues_flwr.flower.client import Site
from clues_flwr.flower.log import say
from clues_flwr.model import ModelSpec, cached
from clues_flwr.partition import splits_for
from clues_flwr.sources import load_records, parse_mapping


def load_site(node: dict, data: DataConfig) -> list[Record]:
    """The site's private records: its ``data-path`` (file, folder or hub dataset, read
    with the optional ``data-format``, ``data-mapping``, ``data-preset``, ``data-split``,
    ``data-subset``) when the node config names one, else (simulation) its partition of
    the run's ``dataset`` or of the demo, chosen by ``partition-id``."""
    if node.get("data-path"):
        return load_records(
            str(node["data-path"]),
            format=str(node.get("data-format", "auto")),
            mapping=parse_mapping(str(node.get("data-mapping", ""))),
            preset=str(node.get("data-preset", "")) or None,
            split=str(node.get("data-split", "train")),
            subset=str(node.get("data-subset", "")) or None,
        )
    if "partition-id" not in node:
        raise ValueError(
            "node config has neither data-path nor partition-id: start the SuperNode with "
            "--node-config 'data-path=\"/path/to/site.jsonl\"'"
        )
    return splits_for(data, int(node["num-partitions"])).pools[int(node["partition-id"])]


@functools.cache  # unbounded: one simulation process serves many sites in turn, and a bounded
# cache smaller than their number misses on every message
def _split(node_json: str, data: DataConfig) -> tuple[tuple[Record, ...], tuple[Record, ...]]:
    train, heldout = split_heldout(load_site(json.loads(node_json), data), data.heldout_fraction, data.seed)
    return tuple(train), tuple(heldout)


def local_split(context: Context) -> tuple[list[Record], list[Record]]:
    """(train, held-out) of this site, built once per process for its node config and the
    run's data settings (a file is parsed, a hub dataset loaded, a demo split made once)."""
    node = json.dumps(dict(context.node_config), sort_keys=True, default=str)
    train, heldout = _split(node, from_mapping(DataConfig, context.run_config))
    return list(train), list(heldout)


def demo_site(context: Context) -> Site:
    """The site: its model and training records, each by its number in the site's data (the
    n-th record, the n-th line of a JSONL file) for the site's own report."""
    model, tokenizer = cached(from_mapping(ModelSpec, context.run_config))
    train, heldout = local_split(context)
    data = from_mapping(DataConfig, context.run_config)
    numbers, held = split_heldout(range(1, len(train) + len(heldout) + 1), data.heldout_fraction, data.seed)
    return Site(model, tokenizer, train, origins=numbers, heldout=held)


def public_sets(data: DataConfig) -> dict[str, list[Record]]:
    """Validation, anchors and test: the ``*-path`` sources where given, else those split
    off the run's ``dataset`` (or the demo) exactly as the sites split it."""
    split = splits_for(data, num_clients=0)
    defaults = {"validation": split.validation, "anchor": split.anchors, "test": split.test}
    paths = {"validation": data.validation_path, "anchor": data.anchor_path, "test": data.test_path}
    return {name: load_records(paths[name]) if paths[name] else records for name, records in defaults.items()}


def central_evaluate(model, tokenizer, test: list[Record], cfg: AppConfig, server_round: int, arrays: ArrayRecord):
    """Test loss and exact-match accuracy of the global adapter on the public test set."""
    set_adapter_state(model, arrays.to_torch_state_dict())
    loss = eval_loss(model, tokenizer, test, cfg.train.batch_size, cfg.train.max_seq_len)
    accuracy = answer_accuracy(model, tokenizer, test, 4 * cfg.train.batch_size, cfg.output.max_new_tokens)
    say(f"round {server_round}: test loss {loss:.4f}, test accuracy {accuracy:.3f}")
    return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

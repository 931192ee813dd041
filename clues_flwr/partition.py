"""Split one pool of records over clients with Flower Datasets partitioners.

``iid`` deals a seeded shuffle out evenly; ``natural`` gives each client the records
sharing one value of a column (the paper's MMedBench setting: one language per client).
The partitioners see only row positions (and the ``natural`` column), never the records:
``datasets`` would keep only the first record's keys and fill gaps with None, whereas
positions hand back the very records given, whatever their keys.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import lru_cache

from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner, NaturalIdPartitioner, Partitioner

from clues_flwr.config import SCHEMES, DataConfig
from clues_flwr.core.data import Record, parse_ratios
from clues_flwr.demo.dataset import DemoSplits, carve, demo_splits, pollute_partitions
from clues_flwr.sources import load_records

_ROW = "__row__"


def _split(records: Sequence[Record], partitioner: Partitioner, columns: Mapping[str, list]) -> list[list[Record]]:
    """Records of each partition, found by the row positions the partitioner returns."""
    partitioner.dataset = Dataset.from_dict({_ROW: list(range(len(records))), **columns})
    return [[records[row] for row in partitioner.load_partition(i)[_ROW]] for i in range(partitioner.num_partitions)]


def _iid(records: Sequence[Record], num_partitions: int, seed: int) -> list[list[Record]]:
    # IidPartitioner cuts contiguous shards without shuffling, so the seed acts here.
    if len(records) < num_partitions:
        raise ValueError(f"partition: {len(records)} records cannot fill {num_partitions} clients")
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    return _split(shuffled, IidPartitioner(num_partitions), {})


def _natural(records: Sequence[Record], num_partitions: int, by: str | None) -> list[list[Record]]:
    if by is None:
        raise ValueError("partition-by: the 'natural' partition needs a column name")
    missing = sum(by not in r for r in records)
    if missing:
        raise ValueError(f"partition-by: column {by!r} is missing from {missing} of {len(records)} records")
    values = sorted({r[by] for r in records})
    if len(values) != num_partitions:
        raise ValueError(
            f"partition-by: column {by!r} has {len(values)} distinct values {values}, "
            f"but there are {num_partitions} clients"
        )
    # NaturalIdPartitioner numbers the values in sorted order, so client i gets values[i].
    return _split(records, NaturalIdPartitioner(partition_by=by), {by: [r[by] for r in records]})


def partition(
    records: Sequence[Record],
    num_partitions: int,
    scheme: str = "iid",
    *,
    by: str | None = None,
    seed: int = 0,
) -> list[list[Record]]:
    """One list per client holding the given records themselves, not copies; ``natural``
    keeps input order within a client, and ``seed`` matters to ``iid`` only."""
    if num_partitions < 1:
        raise ValueError(f"partition: need at least one client, got {num_partitions}")
    if scheme == "iid":
        return _iid(records, num_partitions, seed)
    if scheme == "natural":
        return _natural(records, num_partitions, by)
    raise ValueError(f"partition: unknown scheme {scheme!r}; expected one of {SCHEMES}")


def take(records: Sequence[Record], n: int, seed: int) -> list[Record]:
    """A seeded sample of ``n`` records, to cap a large set (e.g. Medical QA at 16k)."""
    if not 0 <= n <= len(records):
        raise ValueError(f"take: asked for {n} records, but {len(records)} are available")
    return random.Random(seed).sample(list(records), n)


@lru_cache(maxsize=2)
def federated_splits(data: DataConfig, num_clients: int) -> DemoSplits:
    """A simulated federation from ``data.dataset``: anchors, validation and test drawn first
    (kept clean, as public sets are), then ``num-samples`` records (0: all the rest)
    partitioned over the clients, each client capped at ``client-samples`` (0: no cap;
    the paper's 1,052 per MMedBench language) and polluted. Deterministic, so the server
    and every client derive the same splits from the run config alone."""
    by = data.partition_by
    records = load_records(
        data.dataset,
        preset=data.dataset_preset or None,
        split=data.dataset_split,
        subset=data.dataset_subset or None,
        keep=(by,) if by else (),
    )
    shuffled = take(records, len(records), data.seed)
    anchors, validation, test, private = carve(shuffled, data.test_size, 1, f"dataset {data.dataset}")
    if data.num_samples:
        private = take(private, data.num_samples, data.seed + 1)
    if not num_clients:
        return DemoSplits(pretrain=[], validation=validation, anchors=anchors, test=test, pools=[])
    parts = partition(private, num_clients, data.partition, by=by or None, seed=data.seed)
    if data.client_samples:
        small = min(range(num_clients), key=lambda i: len(parts[i]))
        if len(parts[small]) < data.client_samples:
            raise ValueError(
                f"client-samples {data.client_samples}: client {small} has only {len(parts[small])} records"
            )
        parts = [take(part, data.client_samples, data.seed + 2 + i) for i, part in enumerate(parts)]
    pools = pollute_partitions(parts, parse_ratios(data.pollution), data.seed, kinds=data.pollution_kinds)
    return DemoSplits(pretrain=[], validation=validation, anchors=anchors, test=test, pools=pools)


def splits_for(data: DataConfig, num_clients: int) -> DemoSplits:
    """The splits a run's data config describes: those of ``dataset`` when it names one,
    else the demo's. ``num_clients`` 0 gives the public sets only (what the server needs)."""
    if data.dataset:
        return federated_splits(data, num_clients)
    ratios = parse_ratios(data.pollution)
    return demo_splits(num_clients, data.demo_pool_size, ratios, data.test_size, data.seed, data.pollution_kinds)

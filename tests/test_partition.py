"""Partitioning a pool over clients, polluting each client, and capping a set."""

from __future__ import annotations

import dataclasses

import pytest

from clues_flwr.config import DataConfig
from clues_flwr.core.pollution import LOW
from clues_flwr.demo.dataset import demo_records, demo_splits, pollute_partitions
from clues_flwr.partition import federated_splits, partition, take


def _records(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(n)]


def _keys(parts) -> list[list[str]]:
    return [[r["instruction"] for r in p] for p in parts]


def test_iid_is_balanced_disjoint_and_complete():
    records = _records(103)
    parts = partition(records, 4, seed=1)
    assert len(parts) == 4
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    flat = [r["instruction"] for p in parts for r in p]
    assert len(flat) == len(set(flat)) == 103
    assert sorted(flat) == sorted(r["instruction"] for r in records)


def test_iid_is_seeded():
    records = _records(60)
    assert _keys(partition(records, 3, seed=5)) == _keys(partition(records, 3, seed=5))
    assert _keys(partition(records, 3, seed=5)) != _keys(partition(records, 3, seed=6))
    # Shuffled, not cut in input order.
    assert _keys(partition(records, 3, seed=5))[0] != [f"q{i}" for i in range(20)]


def test_iid_needs_a_record_per_client():
    with pytest.raises(ValueError, match="3 records cannot fill 4 clients"):
        partition(_records(3), 4)
    with pytest.raises(ValueError, match="at least one client"):
        partition(_records(3), 0)


def test_records_round_trip_with_heterogeneous_keys():
    records = [
        {"instruction": "a", "input": "", "output": "x", "language": "fr"},
        {"instruction": "b", "input": "i", "output": "y", "language": "en", "quality": "high"},
        {"instruction": "c", "input": "", "output": "z", "language": "fr", "note": "n"},
        {"instruction": "d", "input": "", "output": "w", "language": "en"},
    ]
    by_instruction = {r["instruction"]: r for r in records}
    for parts in (partition(records, 2, seed=3), partition(records, 2, "natural", by="language")):
        got = [r for p in parts for r in p]
        assert sorted(got, key=lambda r: r["instruction"]) == records
        assert all(r == by_instruction[r["instruction"]] for r in got)
        assert all(set(r) == set(by_instruction[r["instruction"]]) for r in got)


def test_natural_gives_one_value_per_client_in_sorted_order():
    languages = ["zh", "en", "fr", "en", "ja", "zh", "fr", "en"]
    records = [
        {"instruction": f"q{i}", "input": "", "output": "a", "language": lang} for i, lang in enumerate(languages)
    ]
    parts = partition(records, 4, "natural", by="language")
    assert [{r["language"] for r in p} for p in parts] == [{"en"}, {"fr"}, {"ja"}, {"zh"}]
    # Within a client, records keep their input order.
    assert _keys(parts)[0] == ["q1", "q3", "q7"]
    assert sum(map(len, parts)) == len(records)


def test_natural_mismatch_lists_the_values():
    records = [{"instruction": "q", "input": "", "output": "a", "language": lang} for lang in ("fr", "en", "fr")]
    with pytest.raises(ValueError, match=r"partition-by.*2 distinct values \['en', 'fr'\].*3 clients"):
        partition(records, 3, "natural", by="language")


def test_bad_settings_name_the_setting():
    records = _records(4)
    with pytest.raises(ValueError, match="partition: unknown scheme 'dirichlet'"):
        partition(records, 2, "dirichlet")
    with pytest.raises(ValueError, match="partition-by: .*needs a column"):
        partition(records, 2, "natural")
    with pytest.raises(ValueError, match="partition-by: column 'language' is missing from 4 of 4"):
        partition(records, 2, "natural", by="language")


def test_pollute_partitions_applies_each_clients_ratio():
    records, translations = demo_records()
    parts = partition(list(records[:90]), 3, seed=0)
    ratios = [0.5, 0.1]
    polluted = pollute_partitions(parts, ratios, seed=7, translations=translations)
    for i, (clean, dirty) in enumerate(zip(parts, polluted)):
        assert len(dirty) == len(clean) == 30
        low = sum(r["quality"] == LOW for r in dirty)
        assert low == round(ratios[i % len(ratios)] * len(clean))  # pollute rounds
        # Questions unchanged; only answers are damaged.
        assert [r["input"] for r in dirty] == [r["input"] for r in clean]


def test_pollute_partitions_without_translations_skips_mixed_language():
    polluted = pollute_partitions([_records(40)], [1.0], seed=0)
    kinds = {r["pollution"] for r in polluted[0]}
    assert kinds == {"cut", "deletion", "exchange", "random-noise"}
    with pytest.raises(ValueError, match="ratios"):
        pollute_partitions([_records(4)], [], seed=0)


def test_pollution_kinds_can_be_chosen_and_are_checked():
    polluted = pollute_partitions([_records(20)], [1.0], seed=0, kinds=("random-noise",))
    assert {r["pollution"] for r in polluted[0]} == {"random-noise"}
    with pytest.raises(ValueError, match="pollution-kinds: unknown 'typo'"):
        pollute_partitions([_records(4)], [1.0], seed=0, kinds=("typo",))
    with pytest.raises(ValueError, match="mixed-language needs translations"):
        pollute_partitions([_records(4)], [1.0], seed=0, kinds=("mixed-language",))
    demo = demo_splits(2, 20, [0.5], test_size=10, kinds=("cut", "exchange"))
    assert {r["pollution"] for p in demo.pools for r in p} == {"none", "cut", "exchange"}


def test_natural_partitions_capped_per_client(tmp_path):
    import json

    rows = [
        {"instruction": "q", "input": f"{lang} {i}", "output": f"a{i}", "file": lang}
        for lang, n in (("en", 300), ("fr", 290), ("ja", 280))
        for i in range(n)
    ]
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(
        dataset=str(path),
        client_samples=200,
        partition="natural",
        partition_by="file",
        pollution="0.25",
        pollution_kinds=("random-noise",),
        test_size=20,
    )
    splits = federated_splits(data, 3)
    assert [len(p) for p in splits.pools] == [200, 200, 200]
    assert [{r["file"] for r in p} for p in splits.pools] == [{"en"}, {"fr"}, {"ja"}]
    assert all(sum(r["quality"] == LOW for r in p) == 50 for p in splits.pools)
    public = {r["input"] for r in splits.anchors + splits.validation + splits.test}
    assert not public & {r["input"] for p in splits.pools for r in p}
    with pytest.raises(ValueError, match="client-samples 300: client 2 has only"):
        federated_splits(dataclasses.replace(data, client_samples=300), 3)


def test_pollute_partitions_reproduces_demo_pools():
    num_clients, pool, ratios, seed, test_size = 3, 40, [0.8, 0.2], 2, 30
    demo = demo_splits(num_clients, pool, ratios, test_size=test_size, seed=seed)
    # The clean pools are the demo's contiguous chunks: strip the labels pollute added.
    records, translations = demo_records()
    by_question = {(r["instruction"], r["input"]): r for r in records}
    chunks = [[by_question[(r["instruction"], r["input"])] for r in p] for p in demo.pools]
    assert pollute_partitions(chunks, ratios, seed=seed, translations=translations) == demo.pools


def test_take_is_a_seeded_sample():
    records = _records(50)
    sample = take(records, 10, seed=4)
    assert len(sample) == 10
    assert len({r["instruction"] for r in sample}) == 10
    assert all(r in records for r in sample)
    assert sample == take(records, 10, seed=4)
    assert sample != take(records, 10, seed=5)
    assert len(take(records, 50, seed=0)) == 50


def test_take_errors_name_both_numbers():
    with pytest.raises(ValueError, match="asked for 51 records, but 50 are available"):
        take(_records(50), 51, seed=0)
    with pytest.raises(ValueError, match="asked for -1"):
        take(_records(50), -1, seed=0)

"""The long-run benchmark: its orchestration share from the app's own spans, and one real
``flwr run`` at the smallest size."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "simulation"))

import bench_rounds  # noqa: E402


def test_app_time_counts_overlapping_spans_once():
    spans = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (9.0, 12.0)]
    assert bench_rounds.union_within(spans, 0.0, 10.0) == pytest.approx(3.0 + 1.0 + 1.0)
    assert bench_rounds.union_within(spans, 2.5, 5.5) == pytest.approx(0.5 + 0.5)
    assert bench_rounds.union_within([], 0.0, 1.0) == 0.0


def test_rounds_run_from_one_round_hook_to_the_next():
    def hook(rnd, start, end, rss, run_dir):
        return {"kind": "server round hook", "round": rnd, "start": start, "end": end, "rss": rss, "run_dir": run_dir}

    events = [
        hook(0, 0.0, 1.0, 100, 10),
        {"kind": "client train", "start": 1.5, "end": 3.5, "rss": 50},
        {"kind": "client train", "start": 2.0, "end": 4.0, "rss": 70},  # at once with the one above
        {"kind": "server aggregate", "start": 4.5, "end": 5.0, "rss": 100},
        hook(1, 5.0, 6.0, 120, 20),
        {"kind": "client train", "start": 7.0, "end": 8.0, "rss": 90},
        hook(2, 9.0, 10.0, 120, 20),
    ]
    rows = bench_rounds.rounds_from(events)
    assert [(r["round"], r["seconds"]) for r in rows] == [(1, 5.0), (2, 4.0)]
    assert rows[0]["app_seconds"] == pytest.approx(2.5 + 0.5 + 1.0)  # handlers once, aggregation, hook
    assert rows[1]["app_seconds"] == pytest.approx(1.0 + 1.0)
    assert [r["client_rss"] for r in rows] == [70, 90] and [r["server_rss"] for r in rows] == [120, 120]
    totals = bench_rounds.summary(rows)
    assert totals["overhead_share"] == pytest.approx((9.0 - 6.0) / 9.0)


@pytest.mark.slow
def test_bench_rounds_measures_a_real_flwr_run(tmp_path, capsys):
    small = ["demo-pool-size=24", "trace-rounds=1", "test-size=20", "max-new-tokens=4", "evaluate-every=2"]
    argv = ["--nodes", "2", "--rounds", "3", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]
    result = bench_rounds.main(argv + [f"--set={kv}" for kv in small])
    assert result["rounds"] == 3 and 0 < result["median_seconds"] <= result["p90_seconds"]
    assert 0 < result["overhead_share"] < 1
    assert result["server_rss_mib"]["last"] > 100 and result["client_rss_mib"]["last"] > 100
    assert result["run_dir_mib"]["last"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("overhead ")
    assert json.loads((tmp_path / "bench_rounds.json").read_text())["rounds"] == 3

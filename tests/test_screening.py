"""Every reply is screened: a malformed score, threshold or evaluate reply is a failure of
that site, and the run goes on while enough sites remain."""

import json
import math
import re

import pytest
from flwr.app import MetricRecord, RecordDict
from helpers import SMALL as BASE

from clues_flwr.demo import client_app, server_app
from clues_flwr.flower.protocol import Malformed, ScoreReply, ThresholdReply
from clues_flwr.harness.local_grid import LocalGrid, app_defaults, demo_nodes, wire

SMALL = {**BASE, "num-server-rounds": 1, "fraction-evaluate": 1.0}


def test_histogram_and_counts_are_checked_against_what_the_site_reported():
    def score(histogram, total, non_finite, bins):
        reply = ScoreReply(0, [], 0, 0.0, False).encode()
        reply["metrics"] = MetricRecord(
            {"total": total, "histogram": histogram, "non-finite": non_finite, "dp-epsilon": 0.0, "prompt-mismatch": 0}
        )
        return ScoreReply.decode(wire(reply), bins)

    def kept(metrics, scored):
        return ThresholdReply.decode(wire(RecordDict({"metrics": MetricRecord(metrics)})), scored)

    assert score([1, 2, 3, 0], 7, 1, bins=2).total == 7, "6 scored in bins, 1 non-finite"
    assert score([], 6, 0, bins=0).histogram == [], "an anchor rule needs no histogram"
    assert kept({"kept": 3, "total": 6}, 6).kept == 3
    refused = [
        (lambda: score([1, 2, 3], 6, 0, bins=2), "expected 4"),
        (lambda: score([1, -2, 7, 0], 6, 0, bins=2), "histogram = -2"),
        (lambda: score([1, 2, 4, 0], 6, 0, bins=2), "add up to 7"),
        (lambda: score([1, 5], 6, 0, bins=0), "expected 0"),
        (lambda: score([0, 0, 0, 0], 10**12, 0, bins=2), "not a finite number in [0, 1e+09]"),
        (lambda: kept({"kept": 10**6, "total": 54}, 54), "in [0, 54]"),
        (lambda: kept({"kept": 3, "total": 7}, 6), "differs"),
        (lambda: kept({"kept": 3, "total": 6, "tp": 3, "fp": 1, "fn": 1, "tn": 1}, 6), "confusion"),
    ]
    for decode, why in refused:
        with pytest.raises(Malformed, match=re.escape(why)):
            decode()


def breaks(kind):
    """A hook that spoils node 101's reply to one query."""

    def after(node, reply):
        if node != 101:
            return
        kind_of = reply.metadata.message_type
        metrics = reply.content.metric_records.get("metrics")
        if kind == "short" and kind_of == "query.clues_score":
            metrics["histogram"] = list(metrics["histogram"])[:-1]
        elif kind == "missing" and kind_of == "query.clues_score":
            del metrics["histogram"]
        elif kind == "negative" and kind_of == "query.clues_score":
            counts = list(metrics["histogram"])
            counts[0], counts[-1] = -1, counts[-1] + counts[0] + 1  # the same total
            metrics["histogram"] = counts
        elif kind == "kept" and kind_of == "query.clues_threshold":
            metrics["kept"] = 10**6

    return after


@pytest.mark.parametrize("kind", ["short", "missing", "negative", "kept"])
def test_a_malformed_selection_reply_is_that_sites_failure(tmp_path, kind, one_thread):
    cfg = {**app_defaults(), **SMALL, "output-dir": str(tmp_path)}
    grid = LocalGrid(client_app.app, demo_nodes(3), cfg, after=breaks(kind))
    folder = server_app.run_clues(grid, cfg)
    selection = json.loads((folder / "selection.json").read_text())
    failures = json.loads((folder / "metrics.json").read_text())["failures"]
    assert sorted(selection["clients"]) == ["100", "102"], "the other sites are selected and reported"
    assert [(f["where"], f["node"]) for f in failures] == [("threshold" if kind == "kept" else "score", 101)], failures


def test_labelled_unlabelled_and_tiny_sites_federate_together(tmp_path, one_thread):
    """A real site's records carry no quality label; a one-record site has no held-out records."""
    unlabelled = tmp_path / "unlabelled.jsonl"
    rows = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i)} for i in range(30)]
    unlabelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("question,answer\nWhat is one plus one?,two\n")
    nodes = demo_nodes(2)
    nodes[300] = {"data-path": str(unlabelled)}
    nodes[301] = {"data-path": str(tiny), "data-mapping": "instruction=question,output=answer"}
    own = tmp_path / "own-prompts.jsonl"  # prompts of its own, while the server's anchors use the template
    own.write_text(
        "".join(json.dumps({"prompt": f"Q: {i} + {i} = ?\nA:", "output": str(2 * i)}) + "\n" for i in range(30))
    )
    nodes[302] = {"data-path": str(own)}
    cfg = {**app_defaults(), **SMALL, "output-dir": str(tmp_path / "runs"), "num-server-rounds": 2}
    nodes = {node: {**config, "min-heldout": 1} for node, config in nodes.items()}  # 3 or 4 held out
    folder = server_app.run_clues(LocalGrid(client_app.app, nodes, cfg), cfg)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert all("heldout-loss" in r for r in metrics["rounds"][1:]), "the sites' evaluation aggregated every round"
    assert not [f for f in metrics["failures"] if f["where"].startswith("evaluate")], metrics["failures"]
    selection = json.loads((folder / "selection.json").read_text())
    clients = selection["clients"]
    assert "tp" not in clients["300"] and "tp" in clients["100"], "labels are sent only where records carry them"
    assert "f1" in selection and selection["labelled-sites"] == ["partition 0", "partition 1"], "F1 over the labelled"
    assert any(w.startswith("node 301 sends no held-out loss") for w in selection["warnings"]), "the one-record site"
    mismatched = [w for w in selection["warnings"] if "prompts are formatted otherwise" in w]
    assert len(mismatched) == 1 and mismatched[0].startswith("node 302"), selection["warnings"]


def corrupts(how):
    """A hook that spoils every reply node 101 sends, one way."""

    def spoil(value):
        if how == "negative" and isinstance(value, int):
            return -5
        if how == "nan" and isinstance(value, float):
            return math.nan
        return value

    def after(node, reply):
        if node != 101 or reply.has_error():
            return
        for record in reply.content.metric_records.values():
            if how == "dropped":
                del record[sorted(record)[0]]
                continue
            for key, value in list(record.items()):
                record[key] = [spoil(v) for v in value] if isinstance(value, list) else spoil(value)

    return after


@pytest.mark.parametrize("how", ["dropped", "negative", "nan"])
def test_a_site_whose_every_reply_is_corrupted_fails_alone_and_the_run_finishes(tmp_path, how, one_thread):
    """A metric key dropped, counts set to −5, or floats set to NaN, in every reply of one
    site (trace, score, evaluate): each reply is that site's failure, and the run ends as usual."""
    cfg = {**app_defaults(), **SMALL, "output-dir": str(tmp_path), "num-server-rounds": 2}
    nodes = {node: {**config, "min-heldout": 1} for node, config in demo_nodes(3).items()}
    folder = server_app.run_clues(LocalGrid(client_app.app, nodes, cfg, after=corrupts(how)), cfg)
    metrics = json.loads((folder / "metrics.json").read_text())
    failures = metrics["failures"]
    assert {(f["node"], f["site"]) for f in failures} == {(101, "node 101")}, "no reply decoded, so no label"
    assert {f["where"].split()[0] for f in failures} >= {"trace", "score", "evaluate"}, failures
    assert sorted(json.loads((folder / "selection.json").read_text())["clients"]) == ["100", "102"]
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert all(math.isfinite(r["heldout-loss"]) and "train-loss" in r for r in metrics["rounds"][1:])


def test_a_tuning_weight_above_the_records_a_site_scored_is_its_failure(tmp_path, one_thread):
    """One site claiming 10^15 records would take over FedAvg."""

    def inflate(node, reply):
        if node == 101 and reply.metadata.message_type == "train" and not reply.has_error():
            reply.content["metrics"]["num-examples"] = 10**15

    cfg = {**app_defaults(), **SMALL, "output-dir": str(tmp_path)}
    folder = server_app.run_clues(LocalGrid(client_app.app, demo_nodes(3), cfg, after=inflate), cfg)
    failures = json.loads((folder / "metrics.json").read_text())["failures"]
    assert [(f["where"], f["node"]) for f in failures] == [("tune round 1", 101)], failures
    assert "num-examples" in failures[0]["reason"] and "in [0, 36]" in failures[0]["reason"]

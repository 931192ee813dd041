"""A site's records are built once per process, its keep mask is tied to them and to the
run, and it has one name on both sides: the label it sends, or its node ID."""

import json

import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from helpers import SMALL as BASE

from clues_flwr import selected_records
from clues_flwr.demo import client_app, server_app, task
from clues_flwr.flower.client import SELECTION_KEY, site_label, site_name
from clues_flwr.harness.local_grid import LocalGrid, app_defaults, demo_nodes

SMALL = {**BASE, "fraction-evaluate": 1.0}


def run(tmp_path, nodes):
    cfg = {**app_defaults(), **SMALL, "output-dir": str(tmp_path)}
    grid = LocalGrid(client_app.app, nodes, cfg)
    folder = server_app.run_clues(grid, cfg)
    return grid, folder


def test_a_sites_loader_runs_once_per_process_over_a_whole_run(tmp_path, monkeypatch, one_thread):
    calls = []
    load = task.load_site

    def counting(node, data):
        calls.append(node.get("partition-id"))
        return load(node, data)

    task._split.cache_clear()
    monkeypatch.setattr(task, "load_site", counting)
    grid, folder = run(tmp_path, demo_nodes(2))
    phases = {m.metadata.message_type for m in grid.replies}
    assert {"train.clues_trace", "query.clues_score", "query.clues_threshold", "train", "evaluate"} <= phases
    assert len(grid.replies) > 10, "many messages per site"
    assert sorted(calls) == [0, 1], "one load per site, not one per message"


def test_one_process_serving_many_sites_in_turn_loads_each_once(monkeypatch):
    """A simulation process (a Ray actor) serves many nodes round-robin; every site's records
    stay cached however many there are."""
    calls = []
    load = task.load_site
    monkeypatch.setattr(task, "load_site", lambda node, data: calls.append(node["partition-id"]) or load(node, data))
    task._split.cache_clear()
    cfg = {**app_defaults(), "demo-pool-size": 100}
    nodes = [{"partition-id": i, "num-partitions": 20} for i in range(20)]
    for _ in range(3):
        for node in nodes:
            task.local_split(Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=cfg))
    assert sorted(calls) == list(range(20))


def test_a_keep_mask_is_refused_on_other_records_or_in_another_run(tmp_path, one_thread):
    grid, _ = run(tmp_path, demo_nodes(2))
    context = grid.contexts[100]
    records = task.local_split(context)[0]
    config = ConfigRecord({"clues-selection": "clues+perplexity"})
    kept = selected_records(records, config, context)
    assert 0 < len(kept) < len(records)
    assert len(kept) == int(context.state[SELECTION_KEY][SELECTION_KEY].numpy().sum())
    shuffled = records[1:] + records[:1]  # same count, other order: a positional mask would silently misapply
    with pytest.raises(RuntimeError, match="computed on other records"):
        selected_records(shuffled, config, context)
    later = Context(run_id=2, node_id=100, node_config=context.node_config, state=context.state, run_config={})
    with pytest.raises(RuntimeError, match="from another run"):
        selected_records(records, config, later)
    fresh = Context(run_id=1, node_id=100, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(RuntimeError, match="did not take part in the score phase"):
        selected_records(records, config, fresh)


def test_a_site_has_one_name_in_its_own_lines_and_the_servers(tmp_path, caplog, one_thread):
    """Its label where it chose one, a simulated site's partition, else its node ID."""
    nodes = demo_nodes(3)
    nodes[101]["site-label"] = "riverside"
    own = tmp_path / "own.jsonl"
    pool = task.local_split(Context(run_id=0, node_id=102, node_config=nodes[102], state=RecordDict(), run_config={}))
    own.write_text("".join(json.dumps(r) + "\n" for r in pool[0]))
    nodes[102] = {"data-path": str(own)}
    with caplog.at_level("INFO"):
        _, folder = run(tmp_path, nodes)
    clients = json.loads((folder / "selection.json").read_text())["clients"]
    assert [clients[n]["site"] for n in ("100", "101", "102")] == ["partition 0", "riverside", "node 102"]
    for name in ("partition 0", "riverside", "node 102"):
        assert f"{name}: kept " in caplog.text, f"the site's own line names it {name}"
        assert f"  {name}: scored " in caplog.text, f"the server's line names it {name}"
    assert (folder / "rounds.png").stat().st_size > 1000


def test_a_restarted_site_keeps_its_selection_in_its_state_dir(tmp_path, one_thread):
    nodes = demo_nodes(2)
    nodes[100]["state-dir"] = str(tmp_path / "site-state")
    grid, _ = run(tmp_path, nodes)
    config = ConfigRecord({"clues-selection": "clues+perplexity"})
    for node in (100, 101):
        context = grid.contexts[node]
        records = task.local_split(context)[0]
        kept = selected_records(records, config, context)
        restarted = Context(run_id=1, node_id=node, node_config=context.node_config, state=RecordDict(), run_config={})
        if node == 100:  # the mask comes back from disk, checked like the one in memory
            assert selected_records(records, config, restarted) == kept
            with pytest.raises(RuntimeError, match="computed on other records"):
                selected_records(records[1:] + records[:1], config, restarted)
        else:
            with pytest.raises(RuntimeError, match="or restarted: set state-dir"):
                selected_records(records, config, restarted)
    assert sorted(p.name for p in (tmp_path / "site-state").iterdir()) == [
        "clues-ledger-node100.json",
        "clues-report-node100-run1.json",
        "clues-report-node100-run1.png",
        "clues-selection-node100-run1.safetensors",
    ]


def test_two_nodes_sharing_a_state_dir_keep_their_own_masks(tmp_path, one_thread):
    nodes = demo_nodes(2)
    for config in nodes.values():
        config["state-dir"] = str(tmp_path / "shared")
    grid, _ = run(tmp_path, nodes)
    config = ConfigRecord({"clues-selection": "clues+perplexity"})
    for node in (100, 101):
        context = grid.contexts[node]
        records = task.local_split(context)[0]
        restarted = Context(run_id=1, node_id=node, node_config=context.node_config, state=RecordDict(), run_config={})
        assert selected_records(records, config, restarted) == selected_records(records, config, context)


def test_the_site_sees_what_the_selection_did_to_its_data(tmp_path, caplog, one_thread):
    """Its report in state-dir: every record of its data by number, kept, dropped or held out,
    with its signals and score; its log gives the true counts beside the noisy ones it sent."""
    nodes = demo_nodes(2)
    nodes[100].update({"state-dir": str(tmp_path / "state"), "dp-epsilon": 1.0})
    with caplog.at_level("INFO"):
        grid, _ = run(tmp_path, nodes)
    report = json.loads((tmp_path / "state" / "clues-report-node100-run1.json").read_text())
    records = report["records"]
    train, heldout = task.local_split(grid.contexts[100])
    assert [r["line"] for r in records] == list(range(1, len(train) + len(heldout) + 1)), "every record, by number"
    assert sum(r["status"] == "held out" for r in records) == len(heldout) == report["true"]["held-out"]
    kept = [r for r in records if r["status"] == "kept"]
    assert len(kept) == report["true"]["kept"] and report["true"]["total"] == len(train)
    assert all(r["score"] >= report["threshold"] for r in kept)
    assert all(set(r["signals"]) == {"clues", "perplexity", "end-loss", "head-loss", "ifd"} for r in kept)
    assert report["ledger"]["epsilon"] == pytest.approx(1.0) and report["sent"]["total"] >= report["sent"]["kept"]
    mask = grid.contexts[100].state[SELECTION_KEY][SELECTION_KEY].numpy().tolist()
    by_number = {r["line"]: r["status"] for r in records}
    numbers = task.demo_site(grid.contexts[100]).origins  # the training records' numbers, in their order
    assert [by_number[n] == "kept" for n in numbers] == [bool(k) for k in mask], "the mask, mapped to the data"
    line = f"kept {report['true']['kept']}/{len(train)} (sent under DP: kept {report['sent']['kept']} of "
    assert line in caplog.text
    assert (tmp_path / "state" / "clues-report-node100-run1.png").stat().st_size > 1000


def test_site_names_come_from_the_label_the_partition_or_the_node_id():
    def context(node_config: dict) -> Context:
        return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})

    simulated = {"partition-id": 2, "num-partitions": 4}
    assert (site_label(context(simulated)), site_name(context(simulated))) == ("partition 2", "partition 2")
    own = {"data-path": "/site/data.jsonl", "partition-id": 2}  # a file of its own: its partition says nothing
    assert (site_label(context(own)), site_name(context(own))) == (None, "node 7")
    assert site_name(context({**own, "site-label": "riverside"})) == "riverside"
    with pytest.raises(ValueError, match="site-label 'xxxxxxxxxxxxxxxxxxxx'... has 65 characters: at most 64"):
        site_label(context({"site-label": "x" * 65}))

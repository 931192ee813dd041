"""A curious server against the real site handlers over LocalGrid (real serialisation): every
attack of the review that found the per-query limits, averaged DP noise, exact counts beside
noisy ones and label reads through evaluation. Each gets a refusal, or no more than
docs/privacy.md states."""

import json
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from helpers import SMALL as BASE

from clues_flwr.core.privacy import unseen
from clues_flwr.demo import client_app, server_app
from clues_flwr.flower.client import SELECTION_KEY
from clues_flwr.flower.ledger import Ledger
from clues_flwr.harness.local_grid import LocalGrid, app_defaults, demo_nodes

SMALL = {**BASE, "num-server-rounds": 1, "fraction-evaluate": 1.0}


def run(tmp_path, nodes=None, **overrides):
    received = []
    cfg = {**app_defaults(), **SMALL, "output-dir": str(tmp_path / "runs"), **overrides}
    grid = LocalGrid(client_app.app, nodes or demo_nodes(2), cfg, before=lambda node, msg: received.append(msg))
    folder = server_app.run_clues(grid, cfg)
    return grid, folder, received


def first(received, message_type):
    return next(m for m in received if m.metadata.message_type == message_type)


def ask(grid, node, message_type, content):
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=node, message_type=message_type)])
    return reply


def with_config(content, **changes):
    out = RecordDict(dict(content.items()))
    out["config"] = ConfigRecord({**dict(content["config"].items()), **changes})
    return out


def threshold(tau):
    return RecordDict({"config": ConfigRecord({"threshold": tau, "keep-ratio": 0.0})})


@pytest.fixture(scope="module")
def played(tmp_path_factory, one_thread):
    """One ordinary run; the server then keeps its grid and the messages it sent."""
    return run(tmp_path_factory.mktemp("played"))


def test_alternating_score_and_threshold_queries_get_one_answer_each_per_run(played):
    """The binary search: score, τ, score, τ, ... recovered every score and label on main."""
    grid, _, received = played
    score = first(received, "query.clues_score")
    answered = 0
    for tau in np.linspace(-5, 5, 20):
        answered += not ask(grid, 100, "query.clues_score", score.content).has_error()
        reply = ask(grid, 100, "query.clues_threshold", threshold(float(tau)))
        answered += not reply.has_error()
        assert reply.has_error() and "one threshold per scoring" in reply.error.reason
    assert answered == 0, "after the run's own score and threshold queries, nothing more is answered"


def test_many_bins_over_several_queries_are_refused_after_the_first(tmp_path, one_thread):
    grid, _, received = run(tmp_path)
    score = first(received, "query.clues_score")
    fresh = LocalGrid(client_app.app, demo_nodes(2), grid.contexts[100].run_config)
    bins = 0
    for shift in range(5):
        edges = [shift / 5 + i / 10 for i in range(101)]  # 100 bins each, shifted
        reply = ask(fresh, 100, "query.clues_score", with_config(score.content, **{"histogram-edges": edges}))
        bins += 0 if reply.has_error() else len(reply.content["metrics"]["histogram"]) - 2
    assert bins == 100, "one query of at most max-histogram-bins per run, not five"


def test_re_sent_dp_queries_cannot_be_averaged(tmp_path, one_thread):
    nodes = demo_nodes(2)
    nodes[100]["dp-epsilon"] = 1.0
    grid, _, received = run(tmp_path, nodes)
    score = first(received, "query.clues_score")
    replies = [ask(grid, 100, "query.clues_score", score.content) for _ in range(30)]
    assert all(r.has_error() and "scored in this run already" in r.error.reason for r in replies)


def test_across_runs_the_ledger_in_state_dir_caps_scorings_and_epsilon(tmp_path, one_thread):
    """Later runs (new run ids) on the same records: refused past max-scorings or dp-budget,
    and the ledger file, per node, says what was released."""
    state = tmp_path / "state"
    nodes = demo_nodes(2)
    nodes[100].update({"dp-epsilon": 1.0, "dp-budget": 2.0, "state-dir": str(state)})
    nodes[101].update({"max-scorings": 2, "state-dir": str(state)})
    grid, _, received = run(tmp_path, nodes)
    score = first(received, "query.clues_score")
    outcomes = {100: [], 101: []}
    for run_id in (2, 3, 4):
        later = LocalGrid(client_app.app, nodes, grid.contexts[100].run_config)
        for node in (100, 101):
            later.contexts[node].run_id = run_id
            reply = ask(later, node, "query.clues_score", score.content)
            outcomes[node].append(reply.error.reason if reply.has_error() else "answered")
    assert outcomes[100][0] == "answered" and "dp-budget 2" in outcomes[100][1], outcomes[100]
    assert outcomes[101][0] == "answered" and "max-scorings is 2" in outcomes[101][1], outcomes[101]
    assert sorted(p.name for p in state.glob("clues-ledger-*")) == [
        "clues-ledger-node100.json",
        "clues-ledger-node101.json",
    ]
    (entry,) = json.loads((state / "clues-ledger-node100.json").read_text()).values()
    assert entry["epsilon"] == pytest.approx(1.5) and entry["scorings"] == [1, 2] and entry["thresholds"] == [1]


def test_the_noise_is_seeded_with_128_unpredictable_bits():
    """A torch.Generator keeps 32 bits of its seed: 2^32 candidates could be searched. PCG64
    from 128 bits of the OS has nothing to search."""
    entropies = [unseen().bit_generator.seed_seq.entropy for _ in range(20)]
    assert len(set(entropies)) == 20 and max(e.bit_length() for e in entropies) > 100
    assert unseen().integers(2**62) != unseen().integers(2**62)


def test_a_dp_site_sends_no_exact_count_anywhere(tmp_path, one_thread):
    nodes = demo_nodes(3)
    nodes[101].update({"dp-epsilon": 1.0, "min-heldout": 1})
    grid, folder, _ = run(tmp_path, nodes)
    sent = [m for m in grid.replies if m.metadata.src_node_id == 101 and not m.has_error()]
    by_type = {}
    for m in sent:
        by_type.setdefault(m.metadata.message_type, []).append(dict(m.content["metrics"]))
    assert {m["num-examples"] for m in by_type["train.clues_trace"]} == {1}, "the trace weight is 1 under DP"
    (score,) = by_type["query.clues_score"]
    assert "seconds" not in score, "no timing under DP"
    (kept,) = by_type["query.clues_threshold"]
    assert set(kept) == {"kept", "total"}, "no label counts under DP"
    assert {m["num-examples"] for m in by_type["train"]} == {max(kept["kept"], 1)}, "the tuning weight: noisy kept"
    assert all(m["num-examples"] == 1 and m["heldout-clean-examples"] == 0 for m in by_type["evaluate"])


def test_heldout_fraction_zero_from_the_server_releases_no_one_records_loss(tmp_path, one_thread):
    grid, _, _ = run(tmp_path, **{"heldout-fraction": 0.0})
    evaluated = [dict(m.content["metrics"]) for m in grid.replies if m.metadata.message_type == "evaluate"]
    assert evaluated and all(m["num-examples"] == 0 and m["heldout-loss"] == 0.0 for m in evaluated)
    assert all(m["heldout-clean-examples"] == 0 for m in evaluated), "no label of a held-out record either"


def test_the_oracle_selection_from_the_server_is_refused_where_labels_stay_unread(tmp_path, one_thread):
    labelled = tmp_path / "labelled.jsonl"
    rows = [{"instruction": f"What is {i} plus {i}?", "output": str(2 * i), "quality": "high"} for i in range(20)]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    nodes = demo_nodes(2)
    nodes[300] = {"data-path": str(labelled)}
    grid, folder, _ = run(tmp_path, nodes, selection="oracle")
    failures = json.loads((folder / "metrics.json").read_text())["failures"]
    refused = [f for f in failures if f["node"] == 300]
    assert refused and all("allow-labels is false" in f["reason"] for f in refused), failures
    assert not [f for f in failures if f["node"] != 300], "simulated sites read their own labels"


def test_replayed_messages_after_the_run_change_nothing_on_the_site(played):
    grid, _, received = played
    context = grid.contexts[101]
    mask = context.state[SELECTION_KEY][SELECTION_KEY].numpy().copy()
    ask(grid, 101, "query.clues_score", first(received, "query.clues_score").content)
    ask(grid, 101, "query.clues_threshold", threshold(-math.inf))
    assert (context.state[SELECTION_KEY][SELECTION_KEY].numpy() == mask).all(), "the keep mask stands"
    (entry,) = Ledger.of(context).entries.values()
    assert entry["scorings"] == [1] and entry["thresholds"] == [1]


def test_under_an_anchor_rule_a_dp_site_sends_a_noisy_total_of_all_its_records(tmp_path, one_thread):
    """With no histogram asked for, the noisy cells are the finite and the non-finite count:
    the total is about the site's records, not a noisy count of its non-finite scores."""
    nodes = demo_nodes(3)
    nodes[101]["dp-epsilon"] = 1.0
    _, folder, _ = run(tmp_path, nodes, **{"threshold-rule": "anchor-quantile"})
    clients = json.loads((folder / "selection.json").read_text())["clients"]
    private = clients["101"]
    assert private["histogram"] == [] and abs(private["total"] - clients["100"]["total"]) <= 20, private
    assert 0 <= private["kept"] <= private["total"]

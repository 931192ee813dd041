"""A site answers only what its own policy allows: a curious server's queries are refused
on the node, non-finite scores are never kept, and ε-DP noise is the mechanism it says."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from helpers import SMALL as BASE

from clues_flwr.core.privacy import SitePolicy, geometric_noise, noisy_counts
from clues_flwr.core.threshold import histogram, keep, non_finite, standard
from clues_flwr.demo import client_app, server_app
from clues_flwr.harness.local_grid import LocalGrid, app_defaults, demo_nodes

SMALL = {**BASE, "num-server-rounds": 1}


def test_the_policy_refuses_too_many_unsorted_or_non_finite_edges():
    policy = SitePolicy()
    assert policy.edges_problem([0.0, 1.0, 2.0]) is None and policy.edges_problem([]) is None
    assert "max-histogram-bins is 100" in policy.edges_problem(list(range(60_001)))
    assert "increase strictly" in policy.edges_problem([0.0, 2.0, 1.0])
    assert "finite" in policy.edges_problem([0.0, float("nan"), 1.0])
    assert SitePolicy(max_histogram_bins=60_000).edges_problem(list(range(60_001))) is None
    with pytest.raises(ValueError, match="dp-epsilon"):
        SitePolicy(dp_epsilon=-1.0)


def test_non_finite_scores_are_counted_apart_and_never_kept():
    s = torch.tensor([0.5, float("nan"), 2.0, float("inf"), -float("inf"), 1.5])
    assert histogram(s.tolist(), [0.0, 1.0, 2.0]) == [0, 1, 1, 1] and non_finite(s) == 3
    assert keep(s, 1.0, 0.0).tolist() == [False, False, True, False, False, True]
    assert keep(s, None, 0.5).tolist() == [True, False, True, False, False, True], "the top half, all finite"
    with pytest.raises(ValueError, match="1 of 3 anchor scores are not finite"):
        standard([0.0, float("nan"), 1.0], [0.0, 1.0, 2.0], "histogram", 0.9, 10)
    with pytest.raises(ValueError, match="1 of 4 reference scores are not finite"):
        standard([0.0, 1.0], [0.0, 1.0, float("inf"), 2.0], "histogram", 0.9, 10)


def test_the_geometric_mechanism_has_the_two_sided_geometric_law():
    """P(k) = (1 − α)/(1 + α) · α^|k| with α = exp(−ε): checked on 200,000 draws."""
    epsilon, draws = 0.5, 200_000
    noise = geometric_noise(draws, epsilon, np.random.default_rng(0))
    alpha = math.exp(-epsilon)
    for k in (0, 1, -1, 3):
        want = (1 - alpha) / (1 + alpha) * alpha ** abs(k)
        got = float((noise == k).mean())
        assert got == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / draws)), k
    assert float(noise.var()) == pytest.approx(2 * alpha / (1 - alpha) ** 2, rel=0.05)
    assert noisy_counts([0, 0, 0], 0.1, np.random.default_rng(1)) >= [0, 0, 0]


def run(tmp_path, nodes=None):
    received = []
    cfg = {**app_defaults(), **SMALL, "output-dir": str(tmp_path)}
    grid = LocalGrid(client_app.app, nodes or demo_nodes(2), cfg, before=lambda node, msg: received.append(msg))
    folder = server_app.run_clues(grid, cfg)
    return grid, folder, received


def ask(grid, node, message_type, content):
    (reply,) = grid.send_and_receive([Message(content, dst_node_id=node, message_type=message_type)])
    return reply


def test_a_curious_server_is_refused_by_the_site(tmp_path, one_thread):
    grid, _, received = run(tmp_path)
    score = next(m for m in received if m.metadata.message_type == "query.clues_score")
    many = RecordDict(dict(score.content.items()))
    config = dict(score.content["config"].items())
    many["config"] = ConfigRecord({**config, "histogram-edges": [i / 1000 for i in range(60_001)]})
    reply = ask(grid, 100, "query.clues_score", many)
    assert reply.has_error() and "max-histogram-bins" in reply.error.reason
    unsorted = RecordDict(dict(score.content.items()))
    unsorted["config"] = ConfigRecord({**config, "histogram-edges": [0.0, 2.0, 1.0]})
    reply = ask(grid, 100, "query.clues_score", unsorted)
    assert reply.has_error() and "increase strictly" in reply.error.reason
    second = RecordDict({"config": ConfigRecord({"threshold": 0.5, "keep-ratio": 0.0})})
    reply = ask(grid, 100, "query.clues_threshold", second)
    assert reply.has_error() and "one threshold per scoring" in reply.error.reason
    reply = ask(grid, 100, "query.clues_score", score.content)
    assert reply.has_error() and "scored in this run already" in reply.error.reason, "a replayed score query"


def test_a_site_with_dp_sends_noisy_consistent_counts_and_says_its_budget(tmp_path, caplog, one_thread):
    nodes = demo_nodes(3)
    nodes[101]["dp-epsilon"] = 1.0
    with caplog.at_level("INFO"):
        _, folder, _ = run(tmp_path, nodes)
    clients = json.loads((folder / "selection.json").read_text())["clients"]
    private, exact = clients["101"], clients["100"]
    assert private["dp-epsilon"] == 1.0 and exact["dp-epsilon"] == 0.0
    assert "tp" not in private and "tp" in exact, "no confusion counts leave a site under DP"
    assert sum(private["histogram"]) + private["non-finite"] == private["total"], "the total is the noisy cells' sum"
    assert 0 <= private["kept"] <= private["total"]
    assert exact["total"] == 36 and sum(exact["histogram"]) == 36
    assert "(sent under DP: kept " in caplog.text and "ε = 1 of 3 spent)" in caplog.text, "true counts beside sent"


def test_a_tiny_epsilon_drowns_the_counts_in_noise_rather_than_zeroing_them():
    """1 − exp(−ε) is 0 in floating point below ε ≈ 1e-16, which released every count as 0;
    −expm1(−ε) keeps the noise's scale 1/ε."""
    noise = geometric_noise(2000, 1e-12, np.random.default_rng(0))
    assert (noise != 0).all() and float(np.median(np.abs(noise))) > 1e10
    with pytest.raises(ValueError, match="dp-epsilon must be 0 \\(off\\) or an ε of at least 1e-6"):
        SitePolicy(dp_epsilon=1e-9)

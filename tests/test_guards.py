"""Junk a user would expect the default selection to drop: a site whose answers are all long
random noise, and one whose answers are in a script the backbone never saw. Both are real
sites (record files) beside demo sites, through the whole app on the in-process grid."""

from __future__ import annotations

import json
import random
import string

import pytest

from clues_flwr.demo import client_app
from clues_flwr.demo.dataset import demo_splits
from clues_flwr.demo.server_app import run_clues
from clues_flwr.flower.report import guards, pass_rate_bounds
from clues_flwr.harness.local_grid import LocalGrid, app_defaults

DEMO_SITES = 3


def junk_site(path, answer, count: int = 80, seed: int = 0):
    """The demo's questions with ``answer(rng)`` in place of every answer, as a JSONL file."""
    rng = random.Random(seed)
    questions = demo_splits(1, count, [0.0], test_size=10, seed=seed + 17).pools[0]
    path.write_text("".join(json.dumps({**q, "output": answer(rng), "quality": "low"}) + "\n" for q in questions))
    return path


def noise(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + string.punctuation + " ") for _ in range(300))


def unseen_script(rng: random.Random) -> str:
    """Words of Georgian letters, a script the demo backbone never read."""
    return " ".join("".join(chr(rng.randrange(0x10D0, 0x10F0)) for _ in range(rng.randint(3, 8))) for _ in range(6))


def test_the_default_selection_drops_junk_sites(tmp_path, caplog):
    nodes = {100 + i: {"partition-id": i, "num-partitions": DEMO_SITES} for i in range(DEMO_SITES)}
    nodes[200] = {"data-path": str(junk_site(tmp_path / "noise.jsonl", noise))}
    nodes[201] = {"data-path": str(junk_site(tmp_path / "script.jsonl", unseen_script, seed=1))}
    run = {
        **app_defaults(),
        "demo-pool-size": 120,
        "pollution": "0.2",
        "trace-rounds": 2,
        "local-steps": 4,
        "num-server-rounds": 1,
        "max-new-tokens": 4,
        "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path / "runs"),
    }
    with caplog.at_level("INFO"):
        folder = run_clues(LocalGrid(client_app.app, nodes, run), run)
    clients = json.loads((folder / "selection.json").read_text())["clients"]
    for junk in ("200", "201"):
        assert clients[junk]["kept"] <= 0.05 * clients[junk]["total"], (junk, clients[junk])
    assert f"node 200: kept {clients['200']['kept']}/" in caplog.text, "no label: named by its node ID"
    assert "partition 1: kept" in caplog.text
    demo_kept = sum(clients[str(n)]["kept"] for n in range(100, 100 + DEMO_SITES))
    demo_clean = sum(clients[str(n)]["tp"] + clients[str(n)]["fn"] for n in range(100, 100 + DEMO_SITES))
    assert demo_kept >= 0.8 * demo_clean, "the clean demo records still pass"


def test_guards_name_sites_that_keep_nothing_or_everything():
    anchors = [0.0, 1.0, 2.0, 3.0]
    rows = {
        1: {"kept": 0, "total": 10, "threshold": 2.0, "reference-scores": anchors},
        2: {"kept": 10, "total": 10, "threshold": 2.0, "reference-scores": anchors, "site": "site riverside"},
        3: {"kept": 5, "total": 10, "threshold": 2.0, "reference-scores": anchors},
    }
    assert guards(rows, 0.0) == ["site 1 kept none of its 10 records", "site riverside kept all of its 10 records"]


def simulated_sites(rng, polluted_share: float, sites: int = 4, records: int = 250, anchors: int = 10):
    """Clean scores N(0, 1); polluted ones N(3, 1), above clean (pollution the score cannot
    see); τ the anchors' mean, as the paper's rule sets it."""
    anchor_scores = [rng.gauss(0, 1) for _ in range(anchors)]
    tau = sum(anchor_scores) / anchors
    rows = {}
    for node in range(sites):
        scores = [rng.gauss(3, 1) if rng.random() < polluted_share else rng.gauss(0, 1) for _ in range(records)]
        rows[node] = {"kept": sum(x >= tau for x in scores), "total": records, "threshold": tau}
        rows[node]["reference-scores"] = anchor_scores
    return rows


def test_the_pass_rate_guard_fires_on_unseen_pollution_and_stays_quiet_without():
    rng = random.Random(0)
    runs = 200
    quiet = sum(bool(guards(simulated_sites(rng, 0.0), 0.0)) for _ in range(runs))
    fired = sum(bool(guards(simulated_sites(rng, 0.8), 0.0)) for _ in range(runs))
    # nominal 1 %; τ set from the anchors themselves makes their pass count a little less
    # variable than a binomial's, so the measured rate is higher (3.5 % here), still far
    # below the old guard's 29 %
    assert quiet <= 0.05 * runs, f"false alarms in {quiet} of {runs} clean federations"
    assert fired >= 0.8 * runs, f"fired in only {fired} of {runs} federations with 80 % unseen pollution"
    assert not guards(simulated_sites(rng, 0.8), 0.5), "a fixed keep ratio makes no promise to compare"


def test_pass_rate_bounds_are_clopper_pearsons():
    """Against the Beta quantiles (scipy's, computed once): 5 of 10 and 450 of 500 at α = 0.005."""
    assert pass_rate_bounds(5, 10, 0.005) == pytest.approx((0.1283106, 0.8716894), abs=1e-6)
    assert pass_rate_bounds(450, 500, 0.005) == pytest.approx((0.8605316, 0.9316009), abs=1e-6)
    assert pass_rate_bounds(10, 10, 0.005)[1] == 1.0 and pass_rate_bounds(0, 10, 0.005)[0] == 0.0

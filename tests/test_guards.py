"""Junk a user would expect the default selection to drop: a site whose answers are all long
random noise, and one whose answers are in a script the backbone never saw. Both are real
sites (record files) beside demo sites, through the whole app on the in-process grid."""

from __future__ import annotations

import json
import random
import string

from clues_flwr.core.data import demo_splits
from clues_flwr.core.threshold import guards
from clues_flwr.demo import client_app
from clues_flwr.demo.server_app import run_clues
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
    assert f"site noise (node 200): kept {clients['200']['kept']}/" in caplog.text, "named by its file"
    assert "site partition 1 (node 101): kept" in caplog.text
    demo_kept = sum(clients[str(n)]["kept"] for n in range(100, 100 + DEMO_SITES))
    demo_clean = sum(clients[str(n)]["tp"] + clients[str(n)]["fn"] for n in range(100, 100 + DEMO_SITES))
    assert demo_kept >= 0.8 * demo_clean, "the clean demo records still pass"


def test_guards_name_sites_that_keep_nothing_or_everything_and_scores_that_favour_junk():
    anchors = [0.0, 1.0, 2.0, 3.0]  # τ = 2: half the anchors pass
    rows = {
        1: {"kept": 0, "total": 10, "threshold": 2.0, "anchor-scores": anchors},
        2: {"kept": 10, "total": 10, "threshold": 2.0, "anchor-scores": anchors},
        3: {"kept": 9, "total": 10, "threshold": 2.0, "anchor-scores": anchors},
    }
    warnings = guards(rows, 0.0)
    assert warnings[:2] == ["site 1 kept none of its 10 records", "site 2 kept all of its 10 records"]
    assert "63% of the sites' records pass τ but only 50% of the clean anchors do" in warnings[2]
    rows[3]["kept"] = 5
    assert len(guards(rows, 0.0)) == 2, "sites passing as often as the anchors raise no alarm"
    assert len(guards(rows, 0.5)) == 2, "a fixed keep ratio makes no promise to compare"

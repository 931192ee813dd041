"""examples/own-project: a Flower project of its own with CLUES selection in front of FedProx,
run in process through its own ServerApp and ClientApp."""

from __future__ import annotations

import logging
import sys
import tomllib
from pathlib import Path

from flwr.app import Context, RecordDict

from clues_flwr.harness.local_grid import LocalGrid, demo_nodes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own-project"


def test_the_example_project_selects_with_clues_and_tunes_with_its_own_fedprox(monkeypatch, caplog, one_thread):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    for name in [m for m in sys.modules if m.startswith("own_project")]:
        monkeypatch.delitem(sys.modules, name)
    from own_project import client_app, server_app

    run_config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    sent = []
    grid = LocalGrid(client_app.app, demo_nodes(2), run_config, before=lambda node, msg: sent.append((node, msg)))
    with caplog.at_level(logging.INFO):
        report, result = server_app.main(
            grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
        )

    kinds = [msg.metadata.message_type for _, msg in sent]
    assert kinds.count("train.clues_trace") == 2 * 2 and kinds.count("query.clues_score") == 2
    tune = [(node, msg.content["config"]) for node, msg in sent if msg.metadata.message_type == "train"]
    assert len(tune) == 2 * 2 and all(
        c["proximal-mu"] == 0.1 and c["clues-selection"] == "clues+perplexity" for _, c in tune
    )
    assert sorted(report.clients) == [100, 101] and report.failures == []
    trained = {
        r.metadata.src_node_id: r.content["metrics"]["num-examples"]
        for r in grid.replies
        if r.metadata.message_type == "train"
    }
    assert trained == {n: c["kept"] for n, c in report.clients.items()}, "their handler trains on what CLUES kept"
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    assert "[ROUND 2/2]" in caplog.text, "Flower's own round logs"

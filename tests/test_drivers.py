"""The experiment drivers in ``simulation/`` at their smallest sizes: each writes its JSON,
Markdown and PNGs into the shared results folder, and the report links every plot; and a
driver's selection is the app's."""

import json
import sys
from pathlib import Path

import pytest

from clues_flwr.demo.client_app import app as client_app
from clues_flwr.demo.server_app import run_clues
from clues_flwr.harness import bench
from clues_flwr.harness.local_grid import LocalGrid, demo_nodes

sys.path.insert(0, str(Path(__file__).parent.parent / "simulation"))

import ablations  # noqa: E402
import backbone_scale  # noqa: E402
import downstream_table  # noqa: E402
import pollution_sweep  # noqa: E402
import selection_table  # noqa: E402

SETTINGS = ("demo-pool-size=24", "pollution=0.5,0.5", "local-steps=2", "batch-size=32", "test-size=20")
TINY = ["--nodes", "2", *(f"--set={kv}" for kv in SETTINGS)]


pytestmark = pytest.mark.usefixtures("one_thread")


def outputs(out: Path, name: str) -> dict:
    """The driver's JSON, after checking its Markdown is in the report with every plot linked."""
    md = (out / f"{name}.md").read_text()
    report = (out / "report.md").read_text()
    assert md in report
    for png in out.glob(f"{name}*.png"):
        assert f"]({png.name})" in md and png.stat().st_size > 0
    return json.loads((out / f"{name}.json").read_text())


def test_selection_table(tmp_path):
    selection_table.main(
        [*TINY, "--set=trace-rounds=1", "--recall", "0.5", "0.9", "--keep-ratio", "0.5", "--out", str(tmp_path)]
    )
    assert len(list(tmp_path.glob("selection_table*.png"))) == 4
    data = outputs(tmp_path, "selection_table")
    methods = [*bench.VARIANTS, *selection_table.BASELINES, *selection_table.COMBINED]
    rules = [
        "anchor-mean",
        "anchor-quantile r=0.5",
        "anchor-quantile r=0.9",
        "histogram (mixture)",
        "histogram (valley)",
        "keep 50%",
    ]
    assert [(r["method"], r["rule"]) for r in data["rows"]] == [(m, r) for m in methods for r in rules]
    for row in data["rows"]:
        assert 0 <= row["f1"] <= 100 and 0 <= row["precision"] <= 100 and 0 <= row["recall"] <= 100
    oracle = [r for r in data["rows"] if r["method"] == "oracle"]
    assert [r["f1"] for r in oracle[:5]] == [100.0] * 5, "every threshold rule; a fixed ratio is not a threshold"
    assert data["auroc"]["oracle"]["pooled"] == 1.0 and set(data["auroc"]) == set(methods)
    md = (tmp_path / "selection_table.md").read_text()
    assert all(f"| {m} | {r} |" in md for m in methods for r in rules)


def test_ablations(tmp_path):
    ablations.main(
        [
            *TINY,
            "--set=trace-rounds=2",
            "--checkpoints",
            "1",
            "2",
            "--anchor-counts",
            "5",
            "20",
            "--anchor-draws",
            "2",
            "--recall",
            "0.5",
            "0.9",
            "--out",
            str(tmp_path),
        ]
    )
    rules = ["anchor-mean", "anchor-quantile r=0.5", "anchor-quantile r=0.9"]
    expected = {
        "ablation_layer": ("layer", ["0 (first)", "3 (last)"]),
        "ablation_anchors": ("anchors", [5, 20]),
        "ablation_rules": (None, [None]),
        "ablation_checkpoints": ("checkpoints", [1, 2]),
    }
    for name, (key, values) in expected.items():
        assert (tmp_path / f"{name}.png").is_file()
        rows = outputs(tmp_path, name)["rows"]
        assert [(r.get(key), r["rule"]) for r in rows] == [(v, rule) for v in values for rule in rules]
        for r in rows:
            assert 0 <= r.get("f1", r.get("f1_mean")) <= 100
    anchors = outputs(tmp_path, "ablation_anchors")["rows"]
    assert all(len(r["draws"]) == 2 and r["f1_std"] >= 0 for r in anchors)
    assert all(len(d["anchors"]) == r["anchors"] for r in anchors for d in r["draws"])
    # The full trajectory's row of the checkpoint ablation is the rule ablation's.
    full = [r for r in outputs(tmp_path, "ablation_checkpoints")["rows"] if r["checkpoints"] == 2]
    assert [r["f1"] for r in full] == [r["f1"] for r in outputs(tmp_path, "ablation_rules")["rows"]]


def test_backbone_scale_builds_each_size_once_and_ranks_with_both_methods(tmp_path):
    argv = [
        *TINY,
        "--set=trace-rounds=1",
        "--sizes",
        "64x1,96x2",
        "--pretrain-steps",
        "2",
        "--backbones",
        str(tmp_path / "bb"),
        "--out",
        str(tmp_path),
    ]
    backbone_scale.main(argv)
    rows = outputs(tmp_path, "backbone_scale")["rows"]
    assert [(r["size"], r["parameters"] > 0) for r in rows] == [("64x1", True), ("96x2", True)]
    assert rows[0]["parameters"] < rows[1]["parameters"]
    for r in rows:
        for method in ("CLUES", "perplexity"):
            assert 0 <= r[method]["auroc"] <= 1 and 0 <= r[method]["best_f1"] <= 100 and 0 <= r[method]["f1"] <= 100
    built = {f: f.stat().st_mtime_ns for f in (tmp_path / "bb").glob("*/model.safetensors")}
    assert len(built) == 2
    backbone_scale.main(argv)
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "bb").glob("*/model.safetensors")} == built, (
        "a matching backbone is reused"
    )


@pytest.mark.parametrize("sizes", ["128", "100x4", "128x0", "axb", ""])
def test_backbone_scale_refuses_bad_sizes(sizes):
    with pytest.raises(ValueError, match="--sizes"):
        backbone_scale.parse_sizes(sizes)


def test_a_drivers_selection_is_the_apps(tmp_path):
    """The app's run (ServerApp and ClientApp on the in-process grid) and the drivers'
    machinery on the same run config keep the same records at every site."""
    run = bench.run_config(bench.parse_set(SETTINGS), **{"trace-rounds": 2, "output-dir": str(tmp_path)})
    folder = run_clues(LocalGrid(client_app, demo_nodes(2), run), {**run, "num-server-rounds": 1})
    clients = json.loads((folder / "selection.json").read_text())["clients"]
    app_kept = [clients[str(node)]["kept"] for node in demo_nodes(2)]
    b = bench.prepare(run, 2)
    assert b.config.selection.selection == "clues+perplexity+end-loss+head-loss+ifd"
    assert b.config.selection.threshold_rule == "histogram"
    signals = tuple(b.config.selection.selection.split("+"))
    scores = bench.baseline_set_scores(b, list(signals[1:]))
    scores["clues"] = bench.variant_scores(bench.raw_gradients(b, b.sets()), b.trajectory, b.names, b.config.score)
    combined = bench.combined_scores(scores, "sum", signals)
    driver = bench.select(combined, b.clean, ("histogram", b.config.selection.histogram_fit), b.config.selection)
    assert list(driver["kept"].values()) == app_kept
    assert 0 < sum(app_kept) < sum(map(len, b.sites.values())), "a selection that keeps some, not all"
    assert driver["tau"] == pytest.approx(clients["100"]["threshold"], rel=1e-5)


# The federation drivers run the real ServerApp and ClientApp on the in-process grid.
SMALL_RUN = [
    f"--set={kv}"
    for kv in (
        "demo-pool-size=24",
        "test-size=20",
        "trace-rounds=1",
        "local-steps=2",
        "num-server-rounds=1",
        "max-new-tokens=4",
        "fraction-evaluate=0.0",
        "batch-size=8",
    )
]


def test_pollution_sweep(tmp_path):
    pollution_sweep.main(["--levels", "0", "0.5", "--nodes", "2", *SMALL_RUN, "--out", str(tmp_path)])
    rows = outputs(tmp_path, "pollution_sweep")["rows"]
    assert [r["pollution"] for r in rows] == [0.0, 0.5]
    assert rows[0]["precision"] == 100.0, "with no pollution everything kept is clean"
    for r in rows:
        assert 0 < r["kept"] <= 1 and r["loss-none"] > 0 and r["loss-clues"] > 0
    assert (tmp_path / "pollution_sweep.png").is_file()


def test_downstream_table(tmp_path):
    methods = ["none", "oracle", "perplexity", "clues"]
    downstream_table.main(
        ["--setups", "fedavg", "merge", "--methods", *methods, "--nodes", "2", *SMALL_RUN, "--out", str(tmp_path)]
    )
    results = outputs(tmp_path, "downstream_table")["results"]
    assert list(results) == ["fedavg", "merge"]
    for rows in results.values():
        assert [r["selection"] for r in rows] == methods
        losses = {r["selection"]: r["test-loss"] for r in rows}
        assert losses["none"] != losses["oracle"], "training on clean records alone trains another model"
        assert rows[2]["f1"] is not None and rows[0].get("f1") is None
    md = (tmp_path / "downstream_table.md").read_text()
    assert all(f"| {name} |" in md for name in ("mixed data", "oracle", "PPL", "CLUES"))

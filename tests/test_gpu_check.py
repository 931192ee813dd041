"""simulation/gpu_check.py's CPU dry run at tiny sizes: every part gives real figures, a part
that fails is recorded while the others still run, and no process it starts outlives it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "simulation" / "gpu_check.py"
TINY_LLAMA = "--hidden 64 --layers 2 --heads 4 --intermediate 128 --vocab 256 --batch 4 --seq-len 32"
TINY_APP = "--sites 2 --rounds 1 --gpu-share 0 --scale-size 64x1 --scale-steps 2"
SETTINGS = ("demo-pool-size=24", "pollution=0.5,0.5", "local-steps=1", "test-size=20", "trace-rounds=1")
DRY_RUN = [
    "--device",
    "cpu",
    *TINY_LLAMA.split(),
    "--score-samples",
    "8",
    "--score-val",
    "2",
    *TINY_APP.split(),
    *(f"--set={kv}" for kv in (*SETTINGS, "max-new-tokens=4")),
]
MARKER = "GPU_CHECK_TEST"


def survivors(tag: str) -> list[str]:
    """Command lines of the processes whose environment carries ``MARKER=tag``: every process
    the script started inherits it, the SuperLink's Ray workers included."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{MARKER}={tag}".encode() in environ.read_bytes().split(b"\0"):
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def dry_run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "gpu_check.json"
    argv = [sys.executable, str(SCRIPT), *DRY_RUN, "--out", str(out), "--work", str(tmp_path / "work"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARKER: str(tmp_path)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert not survivors(str(tmp_path)), "a process the check started outlived it"
    report = json.loads(out.read_text())
    assert report["env"]["gpu"] == "cpu" and report["env"]["torch"]
    assert all(p["seconds"] >= 0 for p in report["parts"].values() if p["status"] != "skipped")
    assert "written" in done.stdout
    return report


@pytest.mark.slow
def test_dry_run_gives_every_figure(tmp_path):
    parts = dry_run(tmp_path)["parts"]
    assert list(parts) == ["llama", "flwr", "scale"]
    assert {p["status"] for p in parts.values()} == {"ok"}, {k: p.get("error") for k, p in parts.items()}

    llama = parts["llama"]
    assert llama["quantization"] == "8bit" and llama["lora_params"] > 0
    assert llama["train"]["samples_per_s"] > 0 and llama["train"]["peak_memory_bytes"] > 0
    scoring = llama["scoring"]
    assert scoring["samples_per_s"]["batched"] > 0 and scoring["samples_per_s"]["official"] > 0
    assert scoring["batched_peak_memory_bytes"] > 0 and scoring["checkpoints"] == 2
    assert scoring["rel_err"] < 1e-4, "on the CPU both scorers compute the same scores"

    flwr = parts["flwr"]
    assert flwr["succeeded"] and flwr["rounds"] == 1 and flwr["wall_seconds"] > 0
    assert Path(flwr["run_folder"], "metrics.json").is_file()

    scale = parts["scale"]
    assert scale["size"] == "64x1" and scale["pretrained_here"] and scale["parameters"] > 0
    assert 0 <= scale["CLUES"]["auroc"] <= 1 and 0 <= scale["perplexity"]["auroc"] <= 1


@pytest.mark.slow
def test_a_failing_part_is_recorded_and_the_next_still_runs(tmp_path):
    parts = dry_run(tmp_path, "--hidden", "60", "--heads", "7", "--parts", "llama,scale")["parts"]
    assert parts["llama"]["status"] == "error" and "not a multiple" in parts["llama"]["error"]
    assert parts["scale"]["status"] == "ok" and 0 <= parts["scale"]["CLUES"]["auroc"] <= 1


def test_parts_after_the_budget_are_skipped(tmp_path):
    parts = dry_run(tmp_path, "--budget-s", "0")["parts"]
    assert {k: p["status"] for k, p in parts.items()} == dict.fromkeys(("llama", "flwr", "scale"), "skipped")

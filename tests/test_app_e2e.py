"""The real app under `flwr run`, in simulation, against a SuperLink this test owns."""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from clues_flwr.core.data import batches
from clues_flwr.demo.dataset import demo_splits
from clues_flwr.model import load_base, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def superlink(tmp_path):
    """A local simulation SuperLink on a free port, stopped (with its children) by PID."""
    port = free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    proc = subprocess.Popen(
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(tmp_path / "state.db"),
            "--disable-runtime-dependency-installation",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, "flower-superlink exited at start"
                assert time.monotonic() < deadline, "flower-superlink did not come up"
                time.sleep(0.5)
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_flwr_run_selects_tunes_and_writes_a_loadable_adapter(superlink, tmp_path):
    runs = tmp_path / "runs"
    cmd = [
        "flwr",
        "run",
        str(ROOT),
        "--stream",
        "--run-config",
        f"num-server-rounds=2 trace-rounds=1 local-steps=8 output-dir='{runs}'",
        "--federation-config",
        "num-supernodes=3",
    ]
    done = subprocess.run(cmd, env=superlink, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    found = re.search(r"\[clues\] run folder: (\S+)", out)
    assert done.returncode == 0 and found, out[-4000:]
    run_dir = Path(found.group(1))
    assert run_dir.parent == runs and run_dir.is_dir()
    assert not list(runs.glob("*.partial"))

    assert "[clues] score: threshold" in out and "[clues] selection (positive = clean)" in out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2] and metrics["failures"] == []
    assert {"train-loss", "heldout-loss", "test-loss", "test-accuracy"} <= set(metrics["rounds"][-1])
    selection = json.loads((run_dir / "selection.json").read_text())
    assert len(selection["clients"]) == 3
    assert all(0 < c["kept"] <= c["total"] for c in selection["clients"].values())
    assert (run_dir / "selection.png").is_file()

    tok = load_tokenizer(":demo:")
    base = load_base(":demo:", "8bit")
    batch = next(batches(demo_splits(num_clients=0).test[:8], tok, 8, 96))
    with torch.no_grad():
        plain = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tuned = PeftModel.from_pretrained(base, run_dir / "adapter")
    with torch.no_grad():
        adapted = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)

"""Runs that cannot go on say why, once, before they leave anything behind; a rerun of a
stopped run's command goes on from where it stopped."""

import time

import pytest
from flwr.clientapp import ClientApp
from helpers import SMALL

from clues_flwr import CluesClient
from clues_flwr.demo import client_app, server_app
from clues_flwr.demo.task import demo_site
from clues_flwr.harness.local_grid import LocalGrid, app_defaults, demo_nodes


def config(tmp_path, **overrides):
    return {**app_defaults(), **SMALL, "output-dir": str(tmp_path / "runs"), **overrides}


def test_too_few_sites_stop_within_the_round_timeout_naming_the_setting(tmp_path):
    cfg = config(tmp_path, **{"min-available-nodes": 3, "round-timeout": 2.0})
    begun = time.monotonic()
    with pytest.raises(
        RuntimeError, match="only 2 site\\(s\\) connected within round-timeout 2 s, min-available-nodes"
    ):
        server_app.run_clues(LocalGrid(client_app.app, demo_nodes(2), cfg), cfg)
    assert time.monotonic() - begun < 30
    assert not (tmp_path / "runs").exists(), "no run folder before a site connected"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model-name", "no-such-model", "model-name 'no-such-model' is not a model folder here nor in the"),
        ("max-seq-len", 4, "max-seq-len 4 is too short for a prompt and an answer"),
    ],
)
def test_a_model_or_length_that_cannot_work_is_refused_by_its_key(tmp_path, monkeypatch, key, value, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here: fail at once, as a missing name does there
    cfg = config(tmp_path, **{key: value})
    with pytest.raises(ValueError, match=message):
        server_app.run_clues(LocalGrid(client_app.app, demo_nodes(2), cfg), cfg)
    assert not (tmp_path / "runs").exists()


def test_a_client_app_without_a_train_handler_fails_the_run(tmp_path, one_thread):
    """A project that registered CLUES's handlers but no ``@app.train()``: every tuning reply
    is an error, and the run ends with one saying so instead of a quiet "done"."""
    app = ClientApp()
    CluesClient(demo_site).register(app)
    cfg = config(tmp_path)
    with pytest.raises(RuntimeError, match="no tuning round aggregated in 2 round\\(s\\): error reply"):
        server_app.run_clues(LocalGrid(app, demo_nodes(2), cfg), cfg)


class StopsInRound2(LocalGrid):
    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "train":
            if messages[0].content["config"]["server-round"] == 2:
                raise KeyboardInterrupt
        return super().send_and_receive(messages, timeout=timeout)


def test_rerunning_a_stopped_runs_command_resumes_it(tmp_path, caplog, one_thread):
    cfg = config(tmp_path, **{"fraction-evaluate": 1.0})
    with pytest.raises(KeyboardInterrupt):
        server_app.run_clues(StopsInRound2(client_app.app, demo_nodes(2), cfg), cfg)
    (partial,) = (tmp_path / "runs").iterdir()
    with caplog.at_level("INFO"):
        folder = server_app.run_clues(LocalGrid(client_app.app, demo_nodes(2), cfg), cfg)
    assert f"resume: {partial} is this run stopped early" in caplog.text
    assert folder == partial.with_name(partial.name.removesuffix(".partial"))
    assert list((tmp_path / "runs").iterdir()) == [folder], "no second run folder"
    changed = config(tmp_path, **{"learning-rate": 0.01})
    other = server_app.run_clues(LocalGrid(client_app.app, demo_nodes(2), changed), changed)
    assert other != folder, "a finished run, or another config, starts anew"

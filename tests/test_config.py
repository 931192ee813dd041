"""The typed run config: one set of defaults, every value checked before a run starts."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

from clues_flwr.config import (
    MODES,
    NODE_KEYS,
    REGENERATE,
    SCHEMES,
    SELECTIONS,
    AppConfig,
    all_keys,
    from_mapping,
    key_of,
    reference,
    sections,
    to_record,
    toml_value,
)
from clues_flwr.core.aggregation import AGGREGATIONS
from clues_flwr.core.fit import FITS
from clues_flwr.core.pollution import KINDS
from clues_flwr.core.privacy import SitePolicy
from clues_flwr.core.scoring import PRECONDITIONERS, ScoreConfig
from clues_flwr.core.threshold import RULES
from clues_flwr.core.train import TrainConfig
from clues_flwr.demo import client_app, server_app
from clues_flwr.demo.threads import thread_count, threads_mod
from clues_flwr.harness.local_grid import LocalGrid, app_defaults, demo_nodes
from clues_flwr.model import QUANTIZATIONS


def test_pyproject_and_the_dataclasses_agree_on_every_key_and_default():
    toml = app_defaults()
    assert set(toml) == all_keys()
    defaults = AppConfig()
    for name in sections():
        section = getattr(defaults, name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            written = list(value) if isinstance(value, tuple) else value
            parsed = getattr(getattr(AppConfig.from_run_config(toml), name), f.name)
            assert parsed == value, (
                f"{key_of(f)}: pyproject gives {toml[key_of(f)]!r}, {type(section).__name__} {value!r}"
            )
            assert isinstance(written, list) or type(toml[key_of(f)]) is type(written), key_of(f)


DOCS = Path(__file__).resolve().parents[1] / "docs"


def every_field():
    return [(name, f) for name, section in sections().items() for f in dataclasses.fields(section)]


def test_the_configuration_reference_is_generated_from_the_code():
    written = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert written == reference(), f"docs/configuration.md is out of date: regenerate it with `{REGENERATE}`"


def test_every_field_says_what_it_means():
    missing = [f"{name}.{f.name}" for name, f in every_field() if not str(f.metadata.get("help", "")).strip()]
    assert not missing, f"fields without metadata help: {missing}"
    for key, meaning in NODE_KEYS.items():
        assert meaning.strip(), key
    for f in dataclasses.fields(SitePolicy):  # the site's own limits are node-config keys too
        assert key_of(f) in NODE_KEYS, f"{key_of(f)}: a SitePolicy key missing from NODE_KEYS"
    assert not set(NODE_KEYS) & all_keys(), "a key is either the run's or the node's"


@pytest.mark.parametrize(
    "key, choices",
    [
        ("selection", SELECTIONS),
        ("threshold-rule", RULES),
        ("histogram-fit", FITS),
        ("mode", MODES),
        ("aggregation", AGGREGATIONS),
        ("partition", SCHEMES),
        ("quantization", QUANTIZATIONS),
        ("precondition", PRECONDITIONERS),
        ("pollution-kinds", KINDS),
    ],
)
def test_the_help_of_a_choice_names_every_choice(key, choices):
    (meaning,) = {f.metadata["help"] for _, f in every_field() if key_of(f) == key}
    unnamed = [c for c in choices if f"`{c}`" not in meaning]
    assert not unnamed, f"{key}: the help does not name {unnamed}"


def test_the_reference_writes_defaults_as_the_run_config_takes_them():
    toml = app_defaults()
    for _, f in every_field():
        assert tomllib.loads(f"v = {toml_value(f.default)}")["v"] == toml[key_of(f)], key_of(f)
    assert toml_value(("q_proj", "v_proj")) == '"q_proj,v_proj"'
    assert toml_value(()) == '""'
    assert toml_value(True) == "true"


def test_keys_shared_by_sections_take_one_value():
    cfg = AppConfig.from_run_config({"seed": 7, "max-seq-len": 64})
    assert cfg.model.seed == cfg.train.seed == cfg.data.seed == 7
    assert cfg.train.max_seq_len == 64


def test_sections_travel_as_records_and_back():
    score = ScoreConfig(layer=2, modules=("q_proj",), cosine=False, batch_size=4)
    assert from_mapping(ScoreConfig, json.loads(json.dumps(to_record(score)))) == score
    train = TrainConfig(learning_rate=1e-4, local_steps=3, seed=5)
    assert from_mapping(TrainConfig, {**to_record(train), "phase": "tune"}) == train


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora-r", "abc", "lora-r must be an integer, got 'abc'"),
        ("lora-r", 0, "lora-r must be at least 1, got 0"),
        ("batch-size", 0, "batch-size must be at least 1, got 0"),
        ("num-server-rounds", -1, "num-server-rounds must be at least 1, got -1"),
        ("learning-rate", "fast", "learning-rate must be a number, got 'fast'"),
        ("cosine", "yes", "cosine must be true or false, got 'yes'"),
        ("fraction-train", 1.5, "fraction-train must be in \\[0, 1\\], got 1.5"),
        ("partition", "dirichlet", "partition must be one of 'iid', 'natural', got 'dirichlet'"),
        ("pollution-kinds", "cut,typo", "pollution-kinds must be one of .*, got 'typo'"),
        ("pollution", "0.8,2", "pollution: expected ratios in \\[0, 1\\]"),
        ("weight-decay", -0.1, "weight-decay must be 0 or more, got -0.1"),
        ("score-batch-size", 0, "score-batch-size must be at least 1, got 0"),
        ("model-name", "./no/such/folder", "model-name must be an existing model folder, got './no/such/folder'"),
        ("no-such-key", 1, "unknown run-config key\\(s\\): no-such-key"),
        ("histogram-bins", 100_000, "histogram-bins must be from 2 to 100, the sites' default max-histogram-bins"),
    ],
)
def test_a_bad_value_is_refused_with_its_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        AppConfig.from_run_config({**app_defaults(), key: value})


@pytest.mark.parametrize("key, value", [("batch-size", 0), ("aggregation", "foo"), ("num-server-rounds", -1)])
def test_a_bad_value_stops_the_run_before_a_run_folder_exists(tmp_path, key, value):
    cfg = {**app_defaults(), "output-dir": str(tmp_path / "runs"), key: value}
    with pytest.raises(ValueError, match=key):
        server_app.run_clues(LocalGrid(client_app.app, demo_nodes(2), cfg), cfg)
    assert not (tmp_path / "runs").exists()


def test_thread_count_comes_from_what_the_process_was_given():
    assert thread_count({"num-threads": 3}, {"OMP_NUM_THREADS": "8"}, 2) == 3, "the node config first"
    assert thread_count({}, {"OMP_NUM_THREADS": "2"}, 2) == 1, "one thread on a machine with few cores"
    assert thread_count({}, {"OMP_NUM_THREADS": "8"}, 64) == 8, "then the environment (Ray sets it per actor)"
    assert thread_count({}, {}, 32) is None, "torch's own choice on a big one"
    with pytest.raises(ValueError, match="num-threads .* at least 1, got 'many'"):
        thread_count({"num-threads": "many"}, {}, 2)


def test_threads_mod_sets_the_count_before_the_handler():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        context = Context(run_id=1, node_id=5, node_config={"num-threads": 1}, state=RecordDict(), run_config={})
        seen = []
        threads_mod(None, context, lambda msg, ctx: seen.append(torch.get_num_threads()))
        assert seen == [1]
    finally:
        torch.set_num_threads(before)

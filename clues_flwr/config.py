"""The run config, typed and checked once, before any run folder exists.

Every key of ``[tool.flwr.app.config]`` is a field of one section below (a few, ``seed`` and
``max-seq-len``, feed more than one), with the same default: the dataclasses own the
defaults, and a test checks that ``pyproject.toml`` agrees with them key by key. A field's
run-config key is its name with dashes, or the ``key`` in its metadata. Each section checks
its own values in ``__post_init__``, so a section built in code is checked as one parsed from
a run config; every error names the key, the value and what is allowed.

The ConfigRecords sent to clients are sections written out by ``to_record`` and read back by
``from_mapping``, never hand-listed keys.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clues_flwr.core.aggregation import METHODS
from clues_flwr.core.checks import at_least, one_of, require
from clues_flwr.core.data import parse_names, parse_ratios
from clues_flwr.core.pollution import KINDS
from clues_flwr.core.scoring import ScoreConfig
from clues_flwr.core.threshold import FITS, RULES
from clues_flwr.core.train import TrainConfig
from clues_flwr.model import ModelSpec
from clues_flwr.partition import SCHEMES

MODES = ("federated", "merge")
BASELINES = ("perplexity", "ifd", "datainf", "random")
COMBINED = ("clues+perplexity", "clues+ifd")  # signals standardised by the anchors, summed
SELECTIONS = ("clues", *COMBINED, *BASELINES, "none", "oracle")


@dataclass(frozen=True)
class SelectionConfig:
    """Which records each site keeps: the scorer, its trajectory and the threshold rule."""

    method: str = dataclasses.field(default="clues+perplexity", metadata={"key": "selection"})
    trace_rounds: int = 4
    threshold_rule: str = "histogram"
    target_recall: float = 0.9  # anchor-quantile; also the histogram rule's fallback
    keep_ratio: float = 0.0  # 0: the threshold rule; else each site's top share
    histogram_bins: int = 40
    histogram_fit: str = "mixture"

    def __post_init__(self):
        one_of("selection", self.method, SELECTIONS)
        require(
            "trace-rounds", self.trace_rounds, self.trace_rounds >= 1, "at least 1: CLUES scores along a trajectory"
        )
        one_of("threshold-rule", self.threshold_rule, RULES)
        require("target-recall", self.target_recall, 0 < self.target_recall < 1, "in (0, 1)")
        require("keep-ratio", self.keep_ratio, 0 <= self.keep_ratio <= 1, "in [0, 1] (0: the anchor threshold)")
        require("histogram-bins", self.histogram_bins, self.histogram_bins >= 2, "at least 2")
        one_of("histogram-fit", self.histogram_fit, FITS)


@dataclass(frozen=True)
class TuneConfig:
    """How the federation trains on what was kept, and how the trace is laid out."""

    num_server_rounds: int = 4
    mode: str = "federated"
    aggregation: str = "fedavg"
    ties_density: float = 0.5

    def __post_init__(self):
        require("num-server-rounds", self.num_server_rounds, self.num_server_rounds >= 1, "at least 1")
        one_of("mode", self.mode, MODES)
        one_of("aggregation", self.aggregation, METHODS)
        require("ties-density", self.ties_density, 0 < self.ties_density <= 1, "in (0, 1]")
        if self.aggregation == "task-arithmetic" and self.mode == "federated":
            raise ValueError(
                "aggregation 'task-arithmetic' needs mode 'merge': it is the paper's one-shot merge (eqs. 9-10), "
                "and applied every round it compounds (n equal sites scale B·A by n per round)"
            )


@dataclass(frozen=True)
class FederationConfig:
    """How many sites take part and how long the server waits for them."""

    min_available_nodes: int = 2
    min_train_nodes: int = 2
    round_timeout: float = 3600.0
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0

    def __post_init__(self):
        require("min-available-nodes", self.min_available_nodes, self.min_available_nodes >= 1, "at least 1")
        require("min-train-nodes", self.min_train_nodes, self.min_train_nodes >= 1, "at least 1")
        require("round-timeout", self.round_timeout, self.round_timeout > 0, "a positive number of seconds")
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            require(key, value, 0 <= value <= 1, "in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    """Where the records come from: the demo or one dataset split over the sites, polluted."""

    dataset: str = ""
    dataset_preset: str = ""
    dataset_split: str = "train"
    dataset_subset: str = ""
    num_samples: int = 0
    client_samples: int = 0
    partition: str = "iid"
    partition_by: str = ""
    test_path: str = ""
    validation_path: str = ""
    anchor_path: str = ""
    test_size: int = 200
    demo_pool_size: int = 240
    pollution: str = "0.8,0.2,0.1,0.5"
    pollution_kinds: tuple[str, ...] = ()
    heldout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        parse_ratios(self.pollution)
        for kind in self.pollution_kinds:
            one_of("pollution-kinds", kind, KINDS)
        one_of("partition", self.partition, SCHEMES)
        at_least(self, 0, "num-samples", "client-samples")  # 0: all
        at_least(self, 1, "test-size", "demo-pool-size")
        require("heldout-fraction", self.heldout_fraction, 0 <= self.heldout_fraction < 1, "in [0, 1)")


@dataclass(frozen=True)
class OutputConfig:
    """Where the run folder goes, which one to resume, and how the server evaluates."""

    output_dir: str = "runs"
    resume_from: str = ""
    max_new_tokens: int = 12
    evaluate_every: int = 1  # tuning rounds between evaluations (central and on the sites); the last always
    save_every: int = 1  # tuning rounds between saves of the run state; the last always

    def __post_init__(self):
        at_least(self, 1, "max-new-tokens", "evaluate-every", "save-every")


@dataclass(frozen=True)
class AppConfig:
    model: ModelSpec = ModelSpec()
    train: TrainConfig = TrainConfig()
    score: ScoreConfig = ScoreConfig()
    selection: SelectionConfig = SelectionConfig()
    tune: TuneConfig = TuneConfig()
    federation: FederationConfig = FederationConfig()
    data: DataConfig = DataConfig()
    output: OutputConfig = OutputConfig()

    @classmethod
    def from_run_config(cls, run: Mapping[str, Any]) -> "AppConfig":
        """Every section from ``run``; keys it lacks take the defaults, keys no section
        knows are refused (Flower refuses them first under ``flwr run``)."""
        unknown = sorted(set(run) - all_keys())
        if unknown:
            raise ValueError(f"unknown run-config key(s): {', '.join(unknown)}")
        return cls(**{name: from_mapping(section, run) for name, section in sections().items()})


def sections() -> dict[str, type]:
    """Each section's name in ``AppConfig`` and its class."""
    return typing.get_type_hints(AppConfig)


def key_of(field: dataclasses.Field) -> str:
    return field.metadata.get("key", field.name.replace("_", "-"))


def all_keys() -> set[str]:
    return {key_of(f) for section in sections().values() for f in dataclasses.fields(section)}


def _cast(key: str, value: Any, kind: Any) -> Any:
    """``value`` as the field's type, or one error naming the key."""
    if kind is bool:
        require(key, value, isinstance(value, bool), "true or false")
    elif kind is int:
        require(key, value, isinstance(value, int) and not isinstance(value, bool), "an integer")
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        require(key, value, ok, "a number")
        value = float(value)
    elif kind is str:
        require(key, value, isinstance(value, str), "a string")
    else:  # tuple[str, ...]: comma-separated names in a run config, a list in a ConfigRecord
        require(key, value, isinstance(value, str | list | tuple), "comma-separated names")
        value = parse_names(value) if isinstance(value, str) else tuple(str(v) for v in value)
    return value


def from_mapping(cls: type, mapping: Mapping[str, Any]):
    """A section from a run config or a ConfigRecord: its keys cast and checked, absent
    keys at their defaults."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        key = key_of(f)
        if key in mapping:
            values[f.name] = _cast(key, mapping[key], hints[f.name])
    return cls(**values)


def to_record(section) -> dict[str, Any]:
    """A section as run-config keys and values (tuples as lists), ready for a ConfigRecord."""
    return {
        key_of(f): list(v) if isinstance(v := getattr(section, f.name), tuple) else v
        for f in dataclasses.fields(section)
    }

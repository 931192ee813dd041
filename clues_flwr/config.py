"""The run config, typed and checked once, before any run folder exists.

Every key of ``[tool.flwr.app.config]`` is a field of one section below (a few, ``seed`` and
``max-seq-len``, feed more than one), with the same default: the dataclasses own the
defaults, and a test checks that ``pyproject.toml`` agrees with them key by key. A field's
run-config key is its name with dashes, or the ``key`` in its metadata. Each section checks
its own values in ``__post_init__``, so a section built in code is checked as one parsed from
a run config; every error names the key, the value and what is allowed.

The ConfigRecords sent to clients are sections written out by ``to_record`` and read back by
``from_mapping``, never hand-listed keys. Every field carries a one-line ``help``, from which
``reference()`` writes docs/configuration.md (``python -m clues_flwr.config > docs/configuration.md``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clues_flwr.core.aggregation import AGGREGATIONS
from clues_flwr.core.checks import at_least, one_of, require
from clues_flwr.core.combine import COMBINATIONS
from clues_flwr.core.data import parse_names, parse_ratios
from clues_flwr.core.fit import FITS
from clues_flwr.core.pollution import KINDS
from clues_flwr.core.privacy import SitePolicy
from clues_flwr.core.scoring import ScoreConfig
from clues_flwr.core.signals import SIGNALS
from clues_flwr.core.threshold import RULES
from clues_flwr.core.train import TrainConfig
from clues_flwr.model import ModelSpec

MODES = ("federated", "merge")
SCHEMES = ("iid", "natural")  # how a simulation partitions `dataset` (partition.py)
SELECTIONS = (*SIGNALS, "none", "oracle")  # a selection is one of these, or signals joined by "+"


def setting(default: Any, help: str, key: str | None = None) -> Any:
    """A section's field: its default, its one-line help (the configuration reference's
    meaning column) and, where it is not the name with dashes, its run-config key."""
    metadata = {"help": help} if key is None else {"key": key, "help": help}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class SelectionConfig:
    """Which records each site keeps: the scorer, its trajectory and the threshold rule."""

    selection: str = setting(
        "clues+perplexity+end-loss+head-loss+ifd",
        "the selection: one signal or several joined by `+` (each standardised against the public clean reference, "
        "then combined by `combination`): `clues` (traced), the loss profile at the initial adapter `perplexity` "
        "(mean answer loss), `end-loss` (the end-of-answer token), `peak-loss` (the largest token loss), "
        "`head-loss` (the first answer token); `ifd`, FedDQC's `ira`, `datainf`, `random`; "
        "or alone `none` (train on everything) or `oracle` (clean records by their label; benchmarks)",
    )
    combination: str = setting(
        "sum",
        "how the standardised signals of a `+` selection combine: `sum` (a weak signal is outvoted) or `min` "
        "(a record must look clean to every signal)",
    )
    trace_rounds: int = setting(
        4, "checkpoints of the trajectory CLUES scores along (federated mode: FedAvg rounds on all records)"
    )
    threshold_rule: str = setting(
        "histogram",
        "how τ is set: `histogram` (fitted to the sites' pooled score histograms, the public clean reference "
        "saying which part is clean), `anchor-mean` (the paper: the anchors' mean score) or `anchor-quantile` "
        "(the reference's quantile at `target-recall`)",
    )
    target_recall: float = setting(  # anchor-quantile; also the histogram rule's fallback
        0.9,
        "anchor-quantile's clean recall r: τ is the k-th smallest of the n reference scores (validation and "
        "anchors), k = ⌊(1 − r)(n + 1)⌋; "
        "also the rule the histogram rule falls back to when its fit cannot place τ",
    )
    keep_ratio: float = setting(  # 0: the threshold rule; else each site's top share
        0.0, "0: keep what passes τ; else every site keeps its own top share of scores (fixed-ratio selection)"
    )
    histogram_bins: int = setting(
        40,
        "bins of the score histogram each site reports under the histogram rule, over edges the server fixes "
        "from the public clean reference before any site scores (plus an under- and an overflow bin)",
    )
    histogram_fit: str = setting(
        "mixture",
        "the histogram rule's fit: `mixture` (two Gaussians fitted by EM to the binned counts, τ where it expects "
        "the best F1) or `valley` (the lowest point of the smoothed histogram below the reference's mode)",
    )

    def __post_init__(self):
        parts = self.selection.split("+")
        if len(parts) == 1:
            one_of("selection", self.selection, SELECTIONS)
        else:
            require(
                "selection",
                self.selection,
                set(parts) <= set(SIGNALS) and len(set(parts)) == len(parts),
                f"signals joined by '+', each once, from {', '.join(map(repr, SIGNALS))}",
            )
        one_of("combination", self.combination, COMBINATIONS)
        require(
            "trace-rounds", self.trace_rounds, self.trace_rounds >= 1, "at least 1: CLUES scores along a trajectory"
        )
        one_of("threshold-rule", self.threshold_rule, RULES)
        require("target-recall", self.target_recall, 0 < self.target_recall < 1, "in (0, 1)")
        require("keep-ratio", self.keep_ratio, 0 <= self.keep_ratio <= 1, "in [0, 1] (0: the anchor threshold)")
        most = SitePolicy.max_histogram_bins  # more would be refused by every site that keeps its default
        ok = 2 <= self.histogram_bins <= most
        require("histogram-bins", self.histogram_bins, ok, f"from 2 to {most}, the sites' default max-histogram-bins")
        one_of("histogram-fit", self.histogram_fit, FITS)

    @property
    def rule(self) -> str:
        """The rule the score phase applies: a set keep ratio decides alone."""
        return "keep-ratio" if self.keep_ratio else self.threshold_rule


@dataclass(frozen=True)
class TuneConfig:
    """How the federation trains on what was kept, and how the trace is laid out."""

    num_server_rounds: int = setting(4, "tuning rounds on the selected records (merge mode: always one)")
    mode: str = setting(
        "federated",
        "`federated` (one global trajectory, then `num-server-rounds` tuning rounds) or `merge` (each site traces "
        "alone and gets its own τ from the anchors scored on its trajectory, trains `local-epochs` epochs; "
        "one-shot merge)",
    )
    aggregation: str = setting(
        "fedavg",
        "`fedavg`, `ties` (TIES on the updates from the global adapter, `ties-density`), `task-arithmetic` "
        '(paper eqs. 9-10, √w on A and B; a one-shot merge, so `mode = "merge"` only) or `exact` '
        "(the mean of B·A refactored to rank r)",
    )
    ties_density: float = setting(0.5, "share of each update's entries that TIES keeps")

    def __post_init__(self):
        require("num-server-rounds", self.num_server_rounds, self.num_server_rounds >= 1, "at least 1")
        one_of("mode", self.mode, MODES)
        one_of("aggregation", self.aggregation, AGGREGATIONS)
        require("ties-density", self.ties_density, 0 < self.ties_density <= 1, "in (0, 1]")
        if self.aggregation == "task-arithmetic" and self.mode == "federated":
            raise ValueError(
                "aggregation 'task-arithmetic' needs mode 'merge': it is the paper's one-shot merge (eqs. 9-10), "
                "and applied every round it compounds (n equal sites scale B·A by n per round)"
            )


@dataclass(frozen=True)
class FederationConfig:
    """How many sites take part and how long the server waits for them."""

    min_available_nodes: int = setting(
        2,
        "sites to wait for (at most `round-timeout` seconds) before the first phase; Flower waits for as many "
        "before every round, so keep it below the number of sites",
    )
    min_train_nodes: int = setting(
        2,
        "fewest usable replies for a round to aggregate (fewer: the round is skipped and reported) "
        "and for the score phase to go on",
    )
    round_timeout: float = setting(
        3600.0,
        "seconds each round (trace, score, tune, evaluate) waits for replies; a site silent by then is left out "
        "of that round and named in the failures",
    )
    fraction_train: float = setting(1.0, "share of the sites sampled for each training round")
    fraction_evaluate: float = setting(1.0, "share of the sites sampled for each evaluation round")

    def __post_init__(self):
        require("min-available-nodes", self.min_available_nodes, self.min_available_nodes >= 1, "at least 1")
        require("min-train-nodes", self.min_train_nodes, self.min_train_nodes >= 1, "at least 1")
        require("round-timeout", self.round_timeout, self.round_timeout > 0, "a positive number of seconds")
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            require(key, value, 0 <= value <= 1, "in [0, 1]")


@dataclass(frozen=True)
class DataConfig:
    """Where the records come from: the demo or one dataset split over the sites, polluted."""

    dataset: str = setting(
        "",
        "simulate from one dataset (a file, folder or hub name, read like `data-path`): the public sets are drawn "
        "first, the rest partitioned over the SuperNodes and polluted; empty: the demo",
    )
    dataset_preset: str = setting(
        "", "column preset for `dataset` (as `data-preset`); empty: the preset of its name, else its own columns"
    )
    dataset_split: str = setting("train", "the split of `dataset` to read")
    dataset_subset: str = setting("", "the subset (configuration) of `dataset` to read; empty: none")
    num_samples: int = setting(0, "private records in all, drawn after the public sets (0: all the rest)")
    client_samples: int = setting(0, "records per site after partitioning (0: all of its partition)")
    partition: str = setting(
        "iid",
        "`iid` (Flower Datasets' `IidPartitioner` after a seeded shuffle) or `natural` (`NaturalIdPartitioner`: "
        "one value of column `partition-by` per site)",
    )
    partition_by: str = setting("", "the column a `natural` partition splits by")
    test_path: str = setting("", "the public test set (any source `data-path` takes); empty: split off the data")
    validation_path: str = setting(
        "", "the public validation set CLUES aligns gradients with (any source); empty: split off the data"
    )
    anchor_path: str = setting("", "the public anchor records, clean, that set τ (any source); empty: split off")
    test_size: int = setting(200, "records in the public test set split off the demo or `dataset`")
    demo_pool_size: int = setting(240, "private records per demo site")
    pollution: str = setting(
        "0.8,0.2,0.1,0.5",
        "share of polluted records per simulated site, comma-separated and repeated for more sites "
        "(the demo and `dataset`)",
    )
    pollution_kinds: tuple[str, ...] = setting(
        (),
        "comma-separated kinds that take turns: `cut`, `deletion`, `exchange`, `mixed-language`, `random-noise`; "
        "empty: all that apply",
    )
    heldout_fraction: float = setting(0.1, "share of each site's records held out for its local evaluation")
    seed: int = setting(0, "the run's seed; here: the data splits and the pollution")

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

    output_dir: str = setting(
        "runs", "where run folders go, relative to the ServerApp's working directory (or an absolute path)"
    )
    resume_from: str = setting(
        "", "a run folder to continue; only `num-server-rounds` may differ from the run config it saved"
    )
    max_new_tokens: int = setting(12, "answer tokens generated for the exact-match test accuracy")
    evaluate_every: int = setting(
        1,
        "tuning rounds between evaluations (central test loss and accuracy, every site's held-out loss); "
        "before the first round and after the last always",
    )
    save_every: int = setting(
        1,
        "tuning rounds between saves of the run state (also after the score phase and the last round); "
        "a resume repeats at most `save-every` − 1 rounds",
    )

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


# Keys a SuperNode reads from its own node config (`flower-supernode --node-config '...'`), not
# from the run config: each site sets them for itself, and only a `site-label` it sets is ever sent.
NODE_KEYS: dict[str, str] = {
    "data-path": "the site's private records: a JSONL, JSON, CSV or Parquet file, a dataset folder, or a Hugging "
    "Face dataset name; without it (simulation) `partition-id` picks a pool of the demo or of `dataset`",
    "data-format": "`auto` (by the file's suffix), `jsonl`, `json`, `csv` or `parquet`; default `auto`",
    "data-mapping": "record fields from the source's columns, e.g. `instruction=task,input=question,output=answer` "
    "(`=text` is a literal); default: the preset's, or the columns' own names",
    "data-preset": "a built-in column mapping: `medalpaca/medical_meadow_medical_flashcards`, "
    "`axiong/pmc_llama_instructions`, `Henrychur/MMedBench`, `FinGPT/fingpt-fiqa_qa`",
    "data-split": "the split of a folder or hub dataset to read; default `train`",
    "data-subset": "the subset (configuration) of a folder or hub dataset; default none",
    "num-threads": "torch threads per app process of this node; default 1 on a machine with at most 4 cores, "
    "else `OMP_NUM_THREADS` (Ray sets it per simulated site), else torch's own choice",
    "site-label": "opt-in: the name this site goes by in every line, its own console's and the server's, and in "
    "the run's report; sent with its trace and score replies. Unset: a simulated site (`partition-id`, no "
    "`data-path`) sends `partition N`, any other sends nothing and is `node <id>` on both sides",
    "max-histogram-bins": "the most histogram bins this site counts over in one score query; a query asking for more "
    f"is refused; default {SitePolicy.max_histogram_bins}",
    "max-scorings": "the most runs in which this site scores one set of records (a resumed run is one more); past "
    f"it every score query is refused; default {SitePolicy.max_scorings}. Within a run a site always answers one "
    "score query and one threshold query; across runs the limit holds only with `state-dir`",
    "state-dir": "a folder on the site for its ledger of what it released (one JSON file per node, across runs), its "
    "keep mask (one safetensors file per node and run, so a SuperNode restarted mid-run keeps its selection) and its "
    "own report of the selection (per record of its data file: signals, score, kept, dropped or held out; and a "
    "plot); default none: all of it in the node's memory for one run",
    "dp-epsilon": "ε-differential privacy for every count this site sends, per run: two-sided geometric noise, half "
    "of ε on the score histogram, half on the kept count; weights of 1 and no timing, no label counts; default "
    f"{SitePolicy.dp_epsilon:g}: exact counts",
    "dp-budget": "the most ε this site spends on one set of records over all runs (needs `state-dir` to hold across "
    f"runs); past it every score query is refused; default {SitePolicy.dp_budget:g}",
    "min-heldout": "the fewest held-out records this site sends an evaluation loss for (fewer: loss and count 0, "
    f"since one record's loss is that record's); default {SitePolicy.min_heldout}",
    "allow-labels": "whether counts derived from quality labels may leave (confusion counts, clean held-out loss, "
    "the `oracle` selection), for research runs; default true for a simulated site (`partition-id`, no "
    "`data-path`), else false",
}

REGENERATE = "python -m clues_flwr.config > docs/configuration.md"


def toml_value(value: Any) -> str:
    """A default as a run config writes it: strings quoted, names comma-joined in one string,
    booleans in lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = ",".join(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _plain(text: str) -> str:
    """A docstring or help text on one Markdown line (reST ``code`` as `code`, pipes escaped)."""
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def reference() -> str:
    """The configuration reference (docs/configuration.md), written from the sections' fields."""
    readers: dict[str, list[str]] = {}
    for name, section in sections().items():
        for f in dataclasses.fields(section):
            readers.setdefault(key_of(f), []).append(name)
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses (`clues_flwr/config.py`, with `ModelSpec`, `TrainConfig` and "
        f"`ScoreConfig`); do not edit it by hand, regenerate it with `{REGENERATE}`. A test fails when this page "
        "and the code disagree.",
        "",
        "## Run config",
        "",
        "The defaults are `[tool.flwr.app.config]` in `pyproject.toml`, and they are the demo. Override keys with "
        '`flwr run . --run-config "key=value ..."` or with a TOML file (`--run-config conf/paper.toml`). Every '
        "value is checked when the ServerApp starts, before a run folder exists; a bad one stops the run with one "
        "error that names the key, the value and what is allowed. A misspelt key is refused by Flower itself "
        "(`Invalid run configuration.`), which names it only in the SuperLink's log. Lists of names are one "
        "comma-separated string. A key that appears in more than one section takes one value for all of them. "
        "Beside each key is its field in Python: a project of its own writes `local-steps` as "
        "`TrainConfig(local_steps=...)`.",
    ]
    for name, section in sections().items():
        lines += ["", f"### {name} (`{section.__name__}`)", "", _plain(section.__doc__ or ""), ""]
        lines += ["| key | field | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(section):
            key = key_of(f)
            meaning = _plain(f.metadata.get("help", ""))
            others = [other for other in readers[key] if other != name]
            if others:
                meaning += f"; the same key as in {', '.join(others)}"
            lines.append(f"| `{key}` | `{section.__name__}.{f.name}` | `{toml_value(f.default)}` | {meaning} |")
    lines += [
        "",
        "## Node config",
        "",
        "Each SuperNode reads these from its own node config (`flower-supernode ... --node-config "
        "'data-path=\"/data/site.jsonl\" num-threads=4'`); they stay on the site, except a `site-label`, "
        "which goes with the trace and score replies. In simulation Flower sets `partition-id` and `num-partitions`, "
        "which pick the site's pool when there is no `data-path`.",
        "",
        "| key | meaning |",
        "| --- | --- |",
        *(f"| `{key}` | {_plain(meaning)} |" for key, meaning in NODE_KEYS.items()),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")

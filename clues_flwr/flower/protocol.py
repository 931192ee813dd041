"""The wire between a CLUES server and its sites: every message of the trace, score,
threshold, tuning and evaluate phases, both ways, and the only module that writes a wire key.

Each message is a typed class: ``encode`` builds the Flower ``RecordDict``, ``decode`` reads
one back and checks everything a sender could get wrong or make up: types, finiteness,
ranges, lengths, and the bounds between fields (every count within the site's total, a
weight within what the site scored, a total below ``MAX_RECORDS``). A decoder raises
``Malformed`` naming the field; the server counts such a reply as that site's failure and
goes on, a site refuses such a request before it computes anything. What a site sends is
listed field by field in ``docs/privacy.md``, generated from ``WIRE`` below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clues_flwr.config import from_mapping, to_record
from clues_flwr.core.adapter import adapter_key
from clues_flwr.core.aggregation import check_state
from clues_flwr.core.combine import COMBINATIONS
from clues_flwr.core.scoring import ScoreConfig
from clues_flwr.core.signals import SIGNALS
from clues_flwr.core.train import TrainConfig
from clues_flwr.core.trajectory import Checkpoint

# CLUES's own message types, beside a project's ``train``/``evaluate``: Flower routes
# ``train.<action>`` and ``query.<action>`` to the handlers registered for that action.
TRACE_ACTION, SCORE_ACTION, THRESHOLD_ACTION = "clues_trace", "clues_score", "clues_threshold"
TRACE_MESSAGE, SCORE_MESSAGE = f"train.{TRACE_ACTION}", f"query.{SCORE_ACTION}"
THRESHOLD_MESSAGE = f"query.{THRESHOLD_ACTION}"
# In a tuning round's train config (as FedProx adds ``proximal-mu``): which selection to train on.
SELECTION_FLAG = "clues-selection"
# What a site may opt to be named by (its node config's key, and the reply's record).
LABEL_KEY = "site-label"
WEIGHT_KEY = "num-examples"  # Flower's FedAvg default ``weighted_by_key``
CLEAN_LOSS_KEY, CLEAN_EXAMPLES_KEY = "heldout-clean-loss", "heldout-clean-examples"
HELDOUT_LOSS_KEY = "heldout-loss"
MAX_RECORDS = 10**9  # no site holds more: a larger count is made up, and it would outweigh every other site
LABEL_LENGTH = 64  # a site label is a name, not a payload

_CHECKPOINT, _TRAJECTORY, _SCORE_CONFIG, _MOMENTS, _DIRECTION = (
    "checkpoint-",
    "trajectory",
    "score-config",
    "moments",
    "direction",
)


class Malformed(ValueError):
    """A message that does not decode: what is wrong, naming the field."""


# ---- field checks -------------------------------------------------------------------------


def _field(record: Mapping, key: str) -> Any:
    if key not in record:
        raise Malformed(f"no {key}")
    return record[key]


def _exact(record: Mapping, keys: set[str], optional: set[str] = frozenset()) -> None:
    """A CLUES reply carries exactly its keys: a missing one is malformed, an extra one is
    something the site was never meant to send."""
    missing, extra = sorted(keys - set(record)), sorted(set(record) - keys - optional)
    if missing:
        raise Malformed(f"no {', '.join(missing)}")
    if extra:
        raise Malformed(f"unexpected key(s) {', '.join(extra)}")


def _real(value: Any, key: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Malformed(f"{key} is {type(value).__name__} {value!r}, not a number")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high:
        raise Malformed(f"{key} = {value!r} is not a finite number in [{low:g}, {high:g}]")
    return value


def _count(value: Any, key: str, most: int = MAX_RECORDS) -> int:
    number = _real(value, key, 0, most)
    if not number.is_integer():
        raise Malformed(f"{key} = {value!r} is not a whole number")
    return int(number)


def _counts(value: Any, key: str, length: int) -> list[int]:
    if not isinstance(value, list | tuple):
        raise Malformed(f"{key} is {type(value).__name__}, not a list of counts")
    if len(value) != length:
        raise Malformed(f"{key} has {len(value)} counts, expected {length}")
    return [_count(v, key) for v in value]


def _reals(value: Any, key: str, length: int | None = None) -> list[float]:
    if not isinstance(value, list | tuple) or (length is not None and len(value) != length):
        raise Malformed(f"{key} is not a list of {length if length is not None else 'some'} numbers")
    return [_real(v, key) for v in value]


def _text(value: Any, key: str, choices: Sequence[str] | None = None, most: int = 200) -> str:
    if not isinstance(value, str) or len(value) > most:
        raise Malformed(f"{key} is not a string of at most {most} characters")
    if choices is not None and value not in choices:
        raise Malformed(f"{key} {value!r} is not one of {', '.join(choices)}")
    return value


def _tensors(record: Any, key: str) -> dict[str, torch.Tensor]:
    if not isinstance(record, ArrayRecord):
        raise Malformed(f"{key} is not an ArrayRecord")
    tensors = record.to_torch_state_dict()
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise Malformed(f"{key}: {name} has non-finite values (NaN/Inf)")
    return tensors


def _section(cls: type, record: Any, key: str):
    """A config section from the wire, checked by its own rules."""
    if not isinstance(record, ConfigRecord):
        raise Malformed(f"{key} is not a ConfigRecord")
    try:
        return from_mapping(cls, record)
    except (ValueError, TypeError) as err:
        raise Malformed(f"{key}: {err}") from err


def _metrics(content: RecordDict) -> MetricRecord:
    record = content.get("metrics") if isinstance(content, RecordDict) else None
    if not isinstance(record, MetricRecord):
        raise Malformed("no metrics")
    return record


def _config(content: RecordDict) -> ConfigRecord:
    record = content.get("config") if isinstance(content, RecordDict) else None
    if not isinstance(record, ConfigRecord):
        raise Malformed("no config")
    return record


def _adapter(content: RecordDict, reference: Mapping[str, torch.Tensor] | None, key: str = "arrays") -> dict:
    if key not in content or not isinstance(content[key], ArrayRecord):
        raise Malformed("no adapter")
    return _fits(content[key].to_torch_state_dict(), reference, "adapter")


def _fits(state: dict, reference: Mapping[str, torch.Tensor] | None, key: str) -> dict:
    """``state``, if it can be aggregated with ``reference`` (same keys, shapes, finite)."""
    problem = check_state(state, reference) if reference is not None else None
    if problem:
        raise Malformed(f"{key} rejected: {problem}")
    return state


# ---- moments and trajectories ---------------------------------------------------------------


def moment_tensors(exp_avg: Mapping[str, torch.Tensor], exp_avg_sq: Mapping[str, torch.Tensor]) -> dict:
    """Both moments under one set of names, as one ArrayRecord holds them (``moments_of``
    splits them again)."""
    return {**{f"exp_avg/{k}": v for k, v in exp_avg.items()}, **{f"exp_avg_sq/{k}": v for k, v in exp_avg_sq.items()}}


def moments_of(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(exp_avg, exp_avg_sq) from what ``moment_tensors`` wrote (other tensors beside them ignored)."""
    return _strip(tensors, "exp_avg/"), _strip(tensors, "exp_avg_sq/")


def _moments_record(exp_avg: Mapping[str, torch.Tensor], exp_avg_sq: Mapping[str, torch.Tensor]) -> dict:
    return {k: v.float().contiguous() for k, v in moment_tensors(exp_avg, exp_avg_sq).items()}


def _strip(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _moments(tensors: Mapping[str, torch.Tensor], adapter: Mapping[str, torch.Tensor], key: str):
    """(m, v) with the same parameter names, each shaped like that LoRA parameter, v ≥ 0."""
    m, v = moments_of(tensors)
    if not m or set(m) != set(v):
        raise Malformed(f"{key}: exp_avg and exp_avg_sq name different parameters")
    for name in m:
        own = adapter.get(adapter_key(name))
        if own is None:
            raise Malformed(f"{key}: moments of {name}, which is not an adapter parameter")
        if m[name].shape != own.shape or v[name].shape != own.shape:
            raise Malformed(f"{key}: moments of {name} are not shaped like the parameter {tuple(own.shape)}")
        if (v[name] < 0).any():
            raise Malformed(f"{key}: exp_avg_sq of {name} is negative")
    return m, v


def encode_trajectory(trajectory: Sequence[Checkpoint], val_sums: Sequence[torch.Tensor] | None = None) -> dict:
    """One ArrayRecord per checkpoint (adapter, moments, G_t if given) and one ConfigRecord
    of the per-checkpoint scalars, as entries of a RecordDict."""
    out = {}
    for t, ckpt in enumerate(trajectory):
        tensors = {f"adapter/{k}": v.float().contiguous() for k, v in ckpt.adapter.items()}
        tensors.update(_moments_record(ckpt.exp_avg, ckpt.exp_avg_sq))
        if val_sums is not None:
            tensors["validation-sum"] = val_sums[t].float().cpu().contiguous()
        out[f"{_CHECKPOINT}{t}"] = ArrayRecord(tensors)
    out[_TRAJECTORY] = ConfigRecord(
        {
            "lr": [float(c.lr) for c in trajectory],
            "weight-decay": [float(c.weight_decay) for c in trajectory],
            "step": [int(c.step) for c in trajectory],
            "round": [int(c.round) for c in trajectory],
            "beta1": [float(c.betas[0]) for c in trajectory],
            "beta2": [float(c.betas[1]) for c in trajectory],
            "eps": [float(c.eps) for c in trajectory],
        }
    )
    return out


def decode_trajectory(
    content: RecordDict, adapter: Mapping[str, torch.Tensor] | None = None, most: int = 1000
) -> tuple[list[Checkpoint], list[torch.Tensor]]:
    """Checkpoints and validation sums (empty when the sender sent none), each checkpoint's
    adapter fit to aggregate with ``adapter`` when given, every value finite and in range."""
    info = content.get(_TRAJECTORY)
    if not isinstance(info, ConfigRecord):
        raise Malformed("no trajectory")
    steps = info.get("step")
    if not isinstance(steps, list) or not 1 <= len(steps) <= most:
        raise Malformed(f"trajectory of {len(steps) if isinstance(steps, list) else 0} checkpoints, not 1 to {most}")
    n = len(steps)
    lr, decay = _reals(info.get("lr"), "lr", n), _reals(info.get("weight-decay"), "weight-decay", n)
    rounds = [_count(r, "round") for r in _reals(info.get("round"), "round", n)]
    beta1, beta2 = _reals(info.get("beta1"), "beta1", n), _reals(info.get("beta2"), "beta2", n)
    eps = _reals(info.get("eps"), "eps", n)
    trajectory, val_sums = [], []
    for t in range(n):
        key = f"{_CHECKPOINT}{t}"
        tensors = _tensors(content.get(key), key)
        own = _fits(_strip(tensors, "adapter/"), adapter, f"{key} adapter")
        if not (lr[t] >= 0 and decay[t] >= 0 and 0 <= beta1[t] < 1 and 0 <= beta2[t] < 1 and eps[t] > 0):
            raise Malformed(f"{key}: AdamW settings out of range")
        m, v = _moments(tensors, own, key)
        trajectory.append(
            Checkpoint(own, m, v, _count(steps[t], "step"), lr[t], decay[t], rounds[t], (beta1[t], beta2[t]), eps[t])
        )
        if "validation-sum" in tensors:
            val_sums.append(tensors["validation-sum"])
    if val_sums and len(val_sums) != n:
        raise Malformed("validation sums for some checkpoints only")
    return trajectory, val_sums


# ---- the trace ------------------------------------------------------------------------------


def _with_label(content: RecordDict, label: str | None) -> RecordDict:
    """``content`` with the site's label, when it has one (``client.site_label``)."""
    if label:
        content[LABEL_KEY] = ConfigRecord({LABEL_KEY: label})
    return content


def _label(content: RecordDict) -> str | None:
    if LABEL_KEY not in content:
        return None
    record = content[LABEL_KEY]
    return _text(record.get(LABEL_KEY) if isinstance(record, ConfigRecord) else None, LABEL_KEY, None, LABEL_LENGTH)


@dataclass
class TraceRequest:
    """A trace round (or, ``trace-local``, a whole local trajectory in merge mode)."""

    adapter: dict[str, torch.Tensor]
    train: TrainConfig
    score: ScoreConfig
    phase: str
    server_round: int
    trace_rounds: int = 0  # merge mode: checkpoints to trace alone

    def encode(self) -> RecordDict:
        config = {**to_record(self.train), "score-layer": self.score.layer, "score-modules": list(self.score.modules)}
        config.update({"phase": self.phase, "server-round": self.server_round, "trace-rounds": self.trace_rounds})
        return RecordDict({"arrays": ArrayRecord(self.adapter), "config": ConfigRecord(config)})

    @classmethod
    def decode(cls, content: RecordDict) -> TraceRequest:
        config = _config(content)
        phase = _text(_field(config, "phase"), "phase", ("trace", "trace-local"))
        rounds = _count(config.get("trace-rounds", 0), "trace-rounds", 1000)
        if phase == "trace-local" and not rounds:
            raise Malformed("trace-local without trace-rounds")
        return cls(
            _adapter(content, None),
            _section(TrainConfig, config, "config"),
            _section(ScoreConfig, config, "config"),
            phase,
            _count(_field(config, "server-round"), "server-round", 10**6),
            rounds,
        )


@dataclass
class TraceReply:
    """A site's trace round: its adapter and the scoring layer's AdamW moments (federated), or
    its whole trajectory (merge mode). ``num_examples`` is the FedAvg weight."""

    adapter: dict[str, torch.Tensor]
    train_loss: float
    num_examples: int
    adam_step: int
    moments: tuple[dict, dict] | None = None
    trajectory: list[Checkpoint] | None = None
    label: str | None = None

    def encode(self) -> RecordDict:
        metrics = {"train-loss": self.train_loss, WEIGHT_KEY: self.num_examples, "adam-step": self.adam_step}
        content = RecordDict({"arrays": ArrayRecord(self.adapter), "metrics": MetricRecord(metrics)})
        if self.moments is not None:
            content[_MOMENTS] = ArrayRecord(_moments_record(*self.moments))
        if self.trajectory:
            content.update(encode_trajectory(self.trajectory))
        return _with_label(content, self.label)

    @classmethod
    def decode(cls, content: RecordDict, reference: Mapping[str, torch.Tensor], local: bool = False) -> TraceReply:
        """``reference``: the adapter the site was sent; ``local``: a merge-mode trajectory."""
        metrics = _metrics(content)
        _exact(metrics, {"train-loss", WEIGHT_KEY, "adam-step"})
        adapter = _adapter(content, reference)
        weight = _count(metrics[WEIGHT_KEY], WEIGHT_KEY)
        if weight < 1:
            raise Malformed(f"{WEIGHT_KEY} = 0: a site that traced trained on some records")
        reply = cls(
            adapter, _real(metrics["train-loss"], "train-loss"), weight, _count(metrics["adam-step"], "adam-step")
        )
        reply.label = _label(content)
        if local:
            reply.trajectory = decode_trajectory(content, reference)[0]
        else:
            reply.moments = _moments(_tensors(content.get(_MOMENTS), _MOMENTS), adapter, _MOMENTS)
        return reply


# ---- the score query -----------------------------------------------------------------------


@dataclass
class ScoreRequest:
    """What a site scores its records with: the scoring settings, the tokens per record
    (``max_len``, the run's ``max-seq-len``, which its trace used too) and, per signal, what it
    needs (CLUES: the trajectory and the validation sums G_t; the others: the initial
    adapter and a seed, DataInf's direction), how signals combine, each signal's reference mean
    and spread (a combination only), the histogram edges (empty: no histogram asked for)
    and the prompt format of the server's records."""

    signals: list[str]
    combination: str
    edges: list[float]
    prompt_format: str
    score: ScoreConfig
    max_len: int
    references: dict[str, tuple[float, float]] = field(default_factory=dict)
    trajectory: list[Checkpoint] | None = None
    val_sums: list[torch.Tensor] | None = None
    adapter: dict[str, torch.Tensor] | None = None
    direction: torch.Tensor | None = None
    seed: int = 0

    @property
    def selection(self) -> str:
        return "+".join(self.signals)

    def encode(self) -> RecordDict:
        content = RecordDict()
        config: dict[str, Any] = {
            "selection": self.selection,
            "combination": self.combination,
            "histogram-edges": list(self.edges),
            "prompt-format": self.prompt_format,
            "max-seq-len": self.max_len,
            "seed": self.seed,
        }
        config.update({f"reference-{n}": list(stats) for n, stats in self.references.items()})
        if self.trajectory is not None:
            content.update(encode_trajectory(self.trajectory, self.val_sums))
        content[_SCORE_CONFIG] = ConfigRecord(to_record(self.score))
        if self.adapter is not None:
            content["arrays"] = ArrayRecord(self.adapter)
        if self.direction is not None:
            content[_DIRECTION] = ArrayRecord({"u": self.direction.float().contiguous()})
        content["config"] = ConfigRecord(config)
        return content

    @classmethod
    def decode(cls, content: RecordDict) -> ScoreRequest:
        config = _config(content)
        signals = _text(_field(config, "selection"), "selection").split("+")
        unknown = [s for s in signals if s not in SIGNALS]
        if unknown or len(set(signals)) != len(signals):
            raise Malformed(f"selection {config['selection']!r}: signals from {', '.join(SIGNALS)}, each once")
        edges = _reals(config.get("histogram-edges", []), "histogram-edges")  # the site's policy checks the rest
        references = {}
        if len(signals) > 1:
            for name in signals:
                mean, spread = _reals(_field(config, f"reference-{name}"), f"reference-{name}", 2)
                if spread <= 0:
                    raise Malformed(f"reference-{name}: a spread of {spread:g}")
                references[name] = (mean, spread)
        request = cls(
            signals,
            _text(_field(config, "combination"), "combination", COMBINATIONS),
            edges,
            _text(config.get("prompt-format", "template"), "prompt-format"),
            _section(ScoreConfig, content.get(_SCORE_CONFIG), _SCORE_CONFIG),
            _count(_field(config, "max-seq-len"), "max-seq-len", 2**20),
            references,
            seed=int(_real(_field(config, "seed"), "seed", -(2**62), 2**62)),
        )
        if request.max_len < 2:
            raise Malformed(f"max-seq-len = {request.max_len}: a record needs at least 2 tokens")
        if "clues" in signals:
            request.trajectory, request.val_sums = decode_trajectory(content)
            if not request.val_sums:
                raise Malformed("a CLUES score query without the validation sums G_t")
        if any(s != "clues" for s in signals):
            request.adapter = _adapter(content, None)
            if "datainf" in signals:
                request.direction = _tensors(content.get(_DIRECTION), _DIRECTION).get("u")
                if request.direction is None:
                    raise Malformed("a DataInf score query without its direction u")
        return request


@dataclass
class ScoreReply:
    """Counts only: the histogram over the server's edges (empty when none was asked for),
    how many scores were not finite, and the total, their sum; ``seconds`` is left out under
    DP (a timing grows with the record count)."""

    total: int
    histogram: list[int]
    non_finite: int
    dp_epsilon: float
    prompt_mismatch: bool
    seconds: float | None = None
    label: str | None = None

    def encode(self) -> RecordDict:
        metrics = {
            "total": self.total,
            "histogram": self.histogram,
            "non-finite": self.non_finite,
            "dp-epsilon": self.dp_epsilon,
            "prompt-mismatch": int(self.prompt_mismatch),
        }
        if self.seconds is not None:
            metrics["seconds"] = self.seconds
        content = RecordDict({"metrics": MetricRecord(metrics)})
        return _with_label(content, self.label)

    @classmethod
    def decode(cls, content: RecordDict, bins: int) -> ScoreReply:
        """``bins``: the histogram asked for (0: none), so ``bins`` + 2 counts with the open ends."""
        metrics = _metrics(content)
        _exact(metrics, {"total", "histogram", "non-finite", "dp-epsilon", "prompt-mismatch"}, {"seconds"})
        total = _count(metrics["total"], "total")
        histogram = _counts(metrics["histogram"], "histogram", bins + 2 if bins else 0)
        non_finite = _count(metrics["non-finite"], "non-finite", total)
        if bins and sum(histogram) + non_finite != total:
            raise Malformed(f"histogram counts add up to {sum(histogram) + non_finite}, not to the total {total}")
        mismatch = _count(metrics["prompt-mismatch"], "prompt-mismatch", 1)
        seconds = _real(metrics["seconds"], "seconds", 0) if "seconds" in metrics else None
        epsilon = _real(metrics["dp-epsilon"], "dp-epsilon", 0)
        return cls(total, histogram, non_finite, epsilon, bool(mismatch), seconds, _label(content))

    def row(self) -> dict:
        """What the site sent, as the selection report shows it beside its counts."""
        return {"histogram": self.histogram, "non-finite": self.non_finite, "dp-epsilon": self.dp_epsilon}


# ---- the threshold query -------------------------------------------------------------------


@dataclass
class ThresholdRequest:
    """τ, or each site's top share (``keep_ratio`` > 0)."""

    threshold: float | None
    keep_ratio: float

    def encode(self) -> RecordDict:
        config = {"keep-ratio": self.keep_ratio, **({} if self.threshold is None else {"threshold": self.threshold})}
        return RecordDict({"config": ConfigRecord(config)})

    @classmethod
    def decode(cls, content: RecordDict) -> ThresholdRequest:
        config = _config(content)
        ratio = _real(_field(config, "keep-ratio"), "keep-ratio", 0, 1)
        tau = _real(config["threshold"], "threshold") if "threshold" in config else None
        if tau is None and not ratio:
            raise Malformed("neither a threshold nor a keep-ratio")
        return cls(tau, ratio)


CONFUSION = ("tp", "fp", "fn", "tn")


@dataclass
class ThresholdReply:
    """``kept`` of ``total`` records and, from a site that lets its labels be read and sends
    exact counts, the confusion counts (positive = clean)."""

    kept: int
    total: int
    confusion: dict[str, int] | None = None

    def encode(self) -> RecordDict:
        return RecordDict({"metrics": MetricRecord({"kept": self.kept, "total": self.total, **(self.confusion or {})})})

    @classmethod
    def decode(cls, content: RecordDict, scored_total: int) -> ThresholdReply:
        """``scored_total``: the total this site sent with its scores."""
        metrics = _metrics(content)
        labelled = "tp" in metrics
        _exact(metrics, {"kept", "total", *(CONFUSION if labelled else ())})
        total = _count(metrics["total"], "total")
        if total != scored_total:
            raise Malformed(f"total {total} differs from the {scored_total} records the site scored")
        reply = cls(_count(metrics["kept"], "kept", total), total)
        if labelled:
            reply.confusion = {k: _count(metrics[k], k, total) for k in CONFUSION}
            c = reply.confusion
            if c["tp"] + c["fp"] != reply.kept or sum(c.values()) != total:
                raise Malformed("confusion counts do not add up to kept and total")
        return reply


# ---- tuning and evaluation (a project's own handlers) ---------------------------------------


def tuning_config(config: ConfigRecord, selection: str) -> ConfigRecord:
    """A tuning round's train config with the selection each site trains on."""
    return ConfigRecord({**config, SELECTION_FLAG: selection})


def selection_of(config: ConfigRecord) -> str:
    """The selection a tuning round asks for (``none`` when it names none)."""
    return _text(config.get(SELECTION_FLAG, "none"), SELECTION_FLAG)


def _numbers(metrics: MetricRecord) -> None:
    for key, value in metrics.items():
        for v in value if isinstance(value, list) else [value]:
            _real(v, key)


def decode_train_reply(
    content: RecordDict, reference: Mapping[str, torch.Tensor], weight_key: str, most: int = MAX_RECORDS
) -> int:
    """A tuning round's reply of a project's own handler: a finite adapter fit to aggregate,
    finite metrics, and a weight of at most ``most`` (the records the site scored); the weight."""
    metrics = _metrics(content)
    _adapter(content, reference)
    _numbers(metrics)
    return _count(_field(metrics, weight_key), weight_key, most)


def decode_evaluate_reply(content: RecordDict, weight_key: str) -> int:
    """An evaluate reply: finite metrics, a whole weight, and clean counts within it; the weight."""
    metrics = _metrics(content)
    _numbers(metrics)
    weight = _count(_field(metrics, weight_key), weight_key)
    if CLEAN_EXAMPLES_KEY in metrics:
        _count(metrics[CLEAN_EXAMPLES_KEY], CLEAN_EXAMPLES_KEY, weight)
    return weight


# ---- what a site sends, for docs/privacy.md ----------------------------------------------------

WIRE: dict[str, tuple[str, str]] = {  # reply: (when, what), field by field
    TRACE_MESSAGE: (
        "a trace round",
        "the trained LoRA adapter; the scoring layer's AdamW moments `exp_avg`, `exp_avg_sq` (merge mode: the whole "
        "local trajectory, per checkpoint the adapter, the moments and AdamW's settings); `train-loss`; "
        f"`{WEIGHT_KEY}` (the site's record count; 1 under DP); `adam-step`; `{LABEL_KEY}` as below",
    ),
    SCORE_MESSAGE: (
        "once per run",
        "`total`, `histogram` (counts over the server's edges; empty under a rule with no histogram), `non-finite`, "
        "all noised under DP; `dp-epsilon`; `prompt-mismatch` (0 or 1); `seconds` (scoring time; not sent under DP); "
        f"`{LABEL_KEY}` when the site's node config sets one (a simulated site's: `partition N`)",
    ),
    THRESHOLD_MESSAGE: (
        "once per run, after the score query",
        "`kept` (noised under DP), `total` (as sent with the scores); `tp`, `fp`, `fn`, `tn` only when the site "
        "allows its labels to be read and DP is off",
    ),
    "train": (
        "a tuning round (the project's own handler)",
        f"the trained adapter; `train-loss`; `{WEIGHT_KEY}` (records trained on; under DP the noisy kept count "
        "already sent, at least 1)",
    ),
    "evaluate": (
        "an evaluate round (the project's own handler)",
        f"`{HELDOUT_LOSS_KEY}` and `{WEIGHT_KEY}` on the held-out records, 0 and 0 below the site's `min-heldout` "
        f"(under DP the weight is 1); `{CLEAN_LOSS_KEY}` and `{CLEAN_EXAMPLES_KEY}` only when the site allows its "
        "labels to be read and DP is off (else 0)",
    ),
}


def wire_table() -> str:
    """``docs/privacy.md``'s table of what a site sends, from ``WIRE``."""
    rows = [f"| `{message}` | {when} | {what} |" for message, (when, what) in WIRE.items()]
    return "\n".join(["| reply to | when | what the site sends |", "| --- | --- | --- |", *rows])

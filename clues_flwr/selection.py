"""The CLUES selection stage: trace, score, one global standard; a report of what was kept.

``CluesSelection.run`` works on any Flower ``Grid``, alone (selection only) or in front of
any Flower strategy that then tunes on the selected records (``strategy.CluesTuning``):

- *trace* (``mode="federated"``): ``trace-rounds`` FedAvg rounds on all records, run by
  Flower's own ``Strategy.start`` (``TraceStrategy``). Each round's global adapter, with the
  clients' scoring-layer AdamW moments averaged by examples, is a checkpoint, so client and
  anchor scores live in one geometry.
- *trace* (``mode="merge"``, the paper's model-merging setting): every client traces alone
  and uploads its trajectory. Its scores then live in its own geometry, so the server scores
  the anchors on each client's trajectory and sends that client its own τ: the standard stays
  global (the same public anchors and rule), each τ measured with the client's own ruler.
- *score*: the server computes the validation sums G_t and the anchor scores, derives τ by
  the threshold rule, and sends ``query.clues_score`` with the trajectory, G_t, η_t and τ.
  Clients keep S(z) ≥ τ on the node and answer with counts only.
- the paper's baselines (``selection`` perplexity, ifd, datainf, random) skip the trace:
  sites and anchors are scored at the initial adapter, then the same τ or ``keep-ratio``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from clues_flwr.aggregation import fedavg
from clues_flwr.baselines import baseline_scores, datainf_direction
from clues_flwr.calibrate import histogram_threshold
from clues_flwr.combine import combine, standardise
from clues_flwr.config import BASELINES, SelectionConfig, to_record
from clues_flwr.data import Record
from clues_flwr.log import say
from clues_flwr.messages import (
    DIRECTION_KEY,
    MOMENTS_KEY,
    SCORE_CONFIG_KEY,
    SCORE_MESSAGE,
    THRESHOLD_MESSAGE,
    TRACE_MESSAGE,
    moments_from,
    trajectory_from,
    trajectory_records,
)
from clues_flwr.metrics import selection_scores
from clues_flwr.model import set_adapter_state
from clues_flwr.resume import RunState
from clues_flwr.scoring import ScoreConfig, anchor_scores, histogram_edges, threshold
from clues_flwr.screen import Screen
from clues_flwr.train import TrainConfig
from clues_flwr.trajectory import Checkpoint

# What the server needs from the public side: G_t per checkpoint and the anchor scores.
AnchorScorer = Callable[[list[Checkpoint]], tuple[list[torch.Tensor], torch.Tensor]]
# A baseline's anchor scores at an adapter, and the DataInf direction (None for others).
BaselineScorer = Callable[[str, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]]
# Per site (None: every site) what it is sent to score with, and what the report learns.
Public = dict[int | None, tuple[RecordDict, dict]]


@dataclasses.dataclass
class SelectionReport:
    """What the selection stage learned: never a record or a per-record score.

    Parameters
    ----------
    method, threshold_rule : str
        The scorer (``clues``, ``clues+perplexity``, a baseline) and the threshold rule.
    target_recall, keep_ratio : float
        The anchor-quantile target (also the histogram rule's fallback) and the fixed share
        (0: the threshold).
    clients : dict[int, dict]
        Per node: ``kept``, ``total``, the score histogram, τ, the histogram edges, the anchor
        scores and, for labelled records, ``tp fp fn tn``.
    trace : dict[int, dict]
        The trace rounds' aggregated metrics.
    failures : list[dict]
        Every reply a phase could not use (``where``, ``node``, ``reason``).
    warnings : list[str]
        Sites that kept nothing or everything, records passing τ more often than the anchors,
        a histogram rule that fell back to the anchors.
    """

    method: str
    threshold_rule: str
    target_recall: float
    keep_ratio: float
    clients: dict[int, dict] = dataclasses.field(default_factory=dict)
    trace: dict[int, dict] = dataclasses.field(default_factory=dict)
    failures: list[dict] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def counts(self) -> dict[str, int] | None:
        """Confusion counts summed over the sites, when every site's records are labelled."""
        if not self.clients or not all("tp" in r for r in self.clients.values()):
            return None
        return {k: sum(r[k] for r in self.clients.values()) for k in ("tp", "fp", "fn", "tn")}

    def to_state(self) -> dict[str, Any]:
        """All of it as JSON, for the run state and ``metrics.json``; ``selection`` is
        empty when no score phase ran (``none``, ``oracle``)."""
        return {
            "selection": self.to_json() if self.clients else {},
            "trace": {str(r): dict(m) for r, m in self.trace.items()},
            "failures": self.failures,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], selection: SelectionConfig) -> "SelectionReport":
        report = cls.of(selection)
        report.clients = {int(n): row for n, row in state["selection"].get("clients", {}).items()}
        report.trace = {int(r): m for r, m in state["trace"].items()}
        report.failures = list(state["failures"])
        report.warnings = list(state["selection"].get("warnings", []))
        return report

    @classmethod
    def of(cls, selection: SelectionConfig) -> "SelectionReport":
        """An empty report for ``selection``."""
        return cls(selection.method, selection.threshold_rule, selection.target_recall, selection.keep_ratio)

    def to_json(self) -> dict[str, Any]:
        """``selection.json``: the rule, the sites, and precision/recall/F1 when labelled."""
        out = {
            "method": self.method,
            "threshold-rule": self.threshold_rule,
            "target-recall": self.target_recall,
            "keep-ratio": self.keep_ratio,
            "clients": {str(n): r for n, r in self.clients.items()},
            "warnings": self.warnings,
        }
        if self.counts:
            out.update(counts=self.counts, **selection_scores(self.counts))
        return out


def guards(clients: dict[int, dict], keep_ratio: float = 0.0) -> list[str]:
    """What a user should look at before tuning: a site that kept nothing or everything, and
    records passing τ more often than the clean public anchors do (then the score ranks
    some pollution above clean data, since at most the anchors' share of clean records
    should pass, and fewer polluted ones)."""
    out = []
    for node, row in clients.items():
        if row["total"] and row["kept"] in (0, row["total"]):
            what = "none" if row["kept"] == 0 else "all"
            out.append(f"site {node} kept {what} of its {row['total']} records")
    total = sum(r["total"] for r in clients.values())
    if keep_ratio or not total:
        return out
    kept = sum(r["kept"] for r in clients.values())
    anchors = [a >= r["threshold"] for r in clients.values() for a in r["anchor-scores"]]
    passing = sum(anchors) / len(anchors)
    if kept / total > passing + 0.1:
        out.append(
            f"{kept / total:.0%} of the sites' records pass τ but only {passing:.0%} of the clean anchors do: "
            "the score ranks some records above clean data (pollution it cannot see?)"
        )
    return out


class TraceStrategy(FedAvg):
    """FedAvg on all records whose rounds make the global trajectory; run by Flower's
    ``start``. Clients answer ``train.clues_trace`` with their adapter and the scoring
    layer's moments; each round's aggregate and the example-weighted mean of the moments
    are a checkpoint.

    Parameters
    ----------
    screen : Screen
        Where unusable replies are rejected and reported.
    train : TrainConfig
        The trace rounds' hyperparameters (the checkpoints' learning rate and weight decay).
    **fedavg_kwargs
        FedAvg's own (sampling, minimum nodes).
    """

    def __init__(self, screen: Screen, train: TrainConfig, **fedavg_kwargs: Any):
        super().__init__(fraction_evaluate=0.0, **fedavg_kwargs)
        self.screen, self.train = screen, train
        self.trajectory: list[Checkpoint] = []
        self._global: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._global = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        to = [m.metadata.dst_node_id for m in messages]
        return self.screen.sent(
            Message(m.content, dst_node_id=n, message_type=TRACE_MESSAGE) for m, n in zip(messages, to)
        )

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        where = f"trace round {server_round}"
        valid = [m.content for _, m in self.screen.usable(replies, where, self._global)]
        if len(valid) < self.min_train_nodes:
            self.screen.failure(where, None, f"only {len(valid)} usable replies, {self.min_train_nodes} needed")
            return None, None
        weights = [float(c["metrics"][self.weighted_by_key]) for c in valid]
        adapter = fedavg([c["arrays"].to_torch_state_dict() for c in valid], weights)
        ms, vs = zip(*(moments_from(c[MOMENTS_KEY]) for c in valid))
        steps = {int(c["metrics"]["adam-step"]) for c in valid}
        self.trajectory.append(
            Checkpoint(
                adapter=adapter,
                exp_avg=fedavg(ms, weights),
                exp_avg_sq=fedavg(vs, weights),
                step=max(steps),
                lr=self.train.learning_rate,
                weight_decay=self.train.weight_decay,
                round=server_round,
            )
        )
        return ArrayRecord(adapter), self.train_metrics_aggr_fn(valid, self.weighted_by_key)


class CluesSelection:
    """The selection stage on a Grid: ``run`` traces (CLUES) or not (baselines), scores,
    sets τ by the anchors, and returns a ``SelectionReport``; each site keeps its
    selection on the node for its own training handler (``client_app.selected_records``).

    Parameters
    ----------
    score_anchors : AnchorScorer
        Given a trajectory, the validation sums G_t and the anchors' scores (the server holds
        the public validation and anchor sets), e.g. ``partial(scoring.anchor_scores, ...)``.
    score_config : ScoreConfig
        How to score (scoring layer, preconditioning, cosine, batch size).
    selection : SelectionConfig
        The scorer (``clues`` or a baseline), trace rounds, threshold rule and keep ratio.
    train : TrainConfig
        The clients' local training in the trace rounds.
    mode : str
        ``federated`` (one global trajectory) or ``merge`` (every site traces alone).
    score_baseline : BaselineScorer, optional
        For a baseline selection: its anchor scores at an adapter, and DataInf's direction.
    min_available_nodes, min_train_nodes : int
        Sites to wait for, and the fewest usable replies a phase goes on with.
    fraction_train : float
        Share of the sites sampled for each trace round.
    timeout : float
        Seconds each phase waits for replies.
    """

    def __init__(
        self,
        *,
        score_anchors: AnchorScorer,
        score_config: ScoreConfig = ScoreConfig(),
        selection: SelectionConfig = SelectionConfig(),
        train: TrainConfig = TrainConfig(),
        mode: str = "federated",
        score_baseline: BaselineScorer | None = None,
        min_available_nodes: int = 2,
        min_train_nodes: int = 2,
        fraction_train: float = 1.0,
        timeout: float = 3600.0,
    ):
        if set(selection.method.split("+")) & set(BASELINES) and score_baseline is None:
            raise ValueError(f"selection {selection.method!r} needs score_baseline, the server's scorer of the anchors")
        if selection.method in ("none", "oracle"):
            raise ValueError(f"selection {selection.method!r} has no score phase: tune on every record or by label")
        self.score_anchors, self.score_baseline = score_anchors, score_baseline
        self.score_config, self.selection, self.train, self.mode = score_config, selection, train, mode
        self.min_available_nodes, self.min_train_nodes = min_available_nodes, min_train_nodes
        self.fraction_train, self.timeout = fraction_train, timeout
        self.signals = selection.method.split("+")
        self.trajectory: list[Checkpoint] = []
        self.public_info: dict | None = None  # a federated trajectory's τ, edges, anchor scores

    @classmethod
    def from_public(
        cls, model, tokenizer, validation: list[Record], anchors: list[Record], *, seed: int = 0, **kwargs: Any
    ) -> "CluesSelection":
        """The stage for a server that holds ``model`` (a PEFT model) and the public
        ``validation`` and ``anchors`` records: it scores the anchors itself, with CLUES
        along a trajectory and with any baseline at an adapter (DataInf's direction from
        ``validation``). ``kwargs`` are the constructor's."""
        score = kwargs.get("score_config", ScoreConfig())
        sizes = {"batch_size": score.batch_size, "max_len": score.max_len}

        def score_baseline(method: str, adapter: dict[str, torch.Tensor]):
            set_adapter_state(model, adapter)
            direction = datainf_direction(model, tokenizer, validation, **sizes) if method == "datainf" else None
            scored = baseline_scores(method, model, tokenizer, anchors, seed=seed, direction=direction, **sizes)
            return scored, direction

        return cls(
            score_anchors=functools.partial(anchor_scores, model, tokenizer, validation, anchors, cfg=score),
            score_baseline=score_baseline,
            **kwargs,
        )

    def run(self, grid: Grid, initial_arrays: ArrayRecord, store: RunState | None = None) -> SelectionReport:
        """Select on every site. With ``store``, a federated trajectory and its public side
        are saved before the score phase, and a saved one is scored again instead of traced
        anew (a site's selection lives on the node for one run only)."""
        saved = store.load() if store else None
        report = (
            SelectionReport.from_state(saved["report"], self.selection) if saved else SelectionReport.of(self.selection)
        )
        report.clients, report.warnings = {}, []
        screen = Screen(report.failures)
        self.public_info = saved.get("public") if saved else None
        if "clues" not in self.signals:
            say(f"score: {self.selection.method} at the initial adapter (no trace)")
            traced = {None: None}
        elif self.public_info:
            say("resume: scoring again on the saved trajectory")
            self.trajectory, _ = store.trajectory()
            traced = {None: self.trajectory}
        else:
            traced = self.trace(grid, initial_arrays, report)
        public = {key: self._public(initial_arrays, trajectory) for key, trajectory in traced.items()}
        if store and None in public and "clues" in self.signals and not self.public_info:
            content, info = public[None]
            store.save_trajectory(self.trajectory, trajectory_from(content)[1])
            store.save({"round": 0, "public": info, "history": {}, "report": report.to_state()})
        self._score(grid, public, report, screen)
        if None in public:
            self.public_info = public[None][1]
        return report

    # ---- trace ------------------------------------------------------------------------

    def _base(self) -> dict:
        return {
            **to_record(self.train),
            "score-layer": self.score_config.layer,
            "score-modules": list(self.score_config.modules),
        }

    def trace(
        self, grid: Grid, initial_arrays: ArrayRecord, report: SelectionReport | None = None
    ) -> dict[int | None, list[Checkpoint]]:
        """The trajectory every site is scored on (key None), or in merge mode each site's
        own (keyed by node); the trace rounds' metrics and failures go into ``report``.
        Experiment drivers call it alone to score many variants on the app's own trace."""
        report = report if report is not None else SelectionReport.of(self.selection)
        screen = Screen(report.failures)
        rounds = self.selection.trace_rounds
        if self.mode == "federated":
            say(f"trace: {rounds} federated round(s) on all data")
            strategy = TraceStrategy(
                screen,
                self.train,
                fraction_train=self.fraction_train,
                min_train_nodes=self.min_train_nodes,
                min_available_nodes=self.min_available_nodes,
            )
            result = strategy.start(
                grid, initial_arrays, rounds, self.timeout, ConfigRecord({**self._base(), "phase": "trace"})
            )
            report.trace = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
            if not strategy.trajectory:
                raise RuntimeError("trace: no round aggregated, so there is no trajectory to score on")
            self.trajectory = strategy.trajectory
            return {None: strategy.trajectory}
        say(f"trace: every client traces {rounds} checkpoint(s) alone (merge mode)")
        config = ConfigRecord({**self._base(), "phase": "trace-local", "trace-rounds": rounds, "server-round": 0})
        content = RecordDict({"arrays": initial_arrays, "config": config})
        messages = [Message(content, dst_node_id=n, message_type=TRACE_MESSAGE) for n in self._nodes(grid)]
        replies = grid.send_and_receive(screen.sent(messages), timeout=self.timeout)
        trajectories = {
            node: trajectory_from(msg.content)[0]
            for node, msg in screen.usable(replies, "trace", initial_arrays.to_torch_state_dict())
        }
        self._enough(len(trajectories), "trace")
        return trajectories

    # ---- score ------------------------------------------------------------------------

    def _public(self, initial_arrays: ArrayRecord, trajectory: list[Checkpoint] | None) -> tuple[RecordDict, dict]:
        """What a site is sent to score with, and what the report learns of the anchors.

        CLUES scores along ``trajectory``; a baseline at the adapter every site starts from,
        as the paper applies the baselines before any training (DataInf's direction comes
        from the public validation set, so sites and anchors share it). Signals joined by
        ``+`` are each standardised against their anchor scores and summed
        (``combine.combine``), so one global τ means the same at every site."""
        content, config, anchors = RecordDict(), {}, {}
        for name in self.signals:
            if name == "clues":
                val_sums, anchors[name] = self.score_anchors(trajectory)
                for key, record in trajectory_records(trajectory, val_sums).items():
                    content[key] = record
                content[SCORE_CONFIG_KEY] = ConfigRecord(to_record(self.score_config))
                continue
            anchors[name], direction = self.score_baseline(name, initial_arrays.to_torch_state_dict())
            content["arrays"] = initial_arrays
            if direction is not None:
                content[DIRECTION_KEY] = ArrayRecord({"u": direction.float().contiguous()})
            config.update(
                {"batch-size": self.score_config.batch_size, "max-seq-len": self.score_config.max_len},
                seed=self.train.seed,
            )
        if len(self.signals) > 1:
            combined = combine([standardise(anchors[n], anchors[n]) for n in self.signals])
            config.update({f"anchor-scores-{n}": anchors[n].tolist() for n in self.signals})
        else:
            combined = anchors[self.signals[0]]
        rule = self.selection.threshold_rule
        info = {
            "threshold": None if rule == "histogram" else threshold(combined, rule, self.selection.target_recall),
            "histogram-edges": histogram_edges(combined, self.selection.histogram_bins),
            "anchor-scores": combined.tolist(),
        }
        content["config"] = ConfigRecord(
            {**config, "method": self.selection.method, "histogram-edges": info["histogram-edges"]}
        )
        return content, info

    def _score(self, grid: Grid, public: Public, report: SelectionReport, screen: Screen) -> None:
        """Two queries: every site scores its records and sends a histogram; the server sets
        τ (by the anchors, or from the pooled histograms), then every site keeps S(z) ≥ τ (or
        its top ``keep-ratio``) and sends counts."""
        shared = None in public

        def group(node: int) -> int | None:
            return None if shared else node

        nodes = self._nodes(grid) if shared else list(public)
        messages = [Message(public[group(n)][0], dst_node_id=n, message_type=SCORE_MESSAGE) for n in nodes]
        say(f"score: {self.selection.method} on {len(nodes)} site(s)")
        replies = grid.send_and_receive(screen.sent(messages), timeout=self.timeout)
        scored = {node: msg.content["metrics"] for node, msg in screen.usable(replies, "score")}
        self._enough(len(scored), "score")
        for key, (_, info) in public.items():
            histograms = [list(scored[n]["histogram"]) for n in scored if group(n) == key]
            if info["threshold"] is None and histograms:
                info["threshold"] = self._fit_threshold(histograms, info, report)
        taus = sorted({round(info["threshold"], 6) for _, info in public.values() if info["threshold"] is not None})
        ratio = self.selection.keep_ratio
        rule = self.selection.threshold_rule
        say(
            f"score: each site keeps its top {ratio:.0%}"
            if ratio
            else f"score: threshold τ = {', '.join(f'{t:.4g}' for t in taus)} ({rule}); every site applies it"
        )
        messages = [
            Message(
                RecordDict(
                    {"config": ConfigRecord({"threshold": public[group(n)][1]["threshold"], "keep-ratio": ratio})}
                ),
                dst_node_id=n,
                message_type=THRESHOLD_MESSAGE,
            )
            for n in scored
        ]
        replies = grid.send_and_receive(screen.sent(messages), timeout=self.timeout)
        for node, msg in screen.usable(replies, "threshold"):
            m = msg.content["metrics"]
            row = {"kept": int(m["kept"]), "total": int(m["total"]), "histogram": list(scored[node]["histogram"])}
            if "tp" in m:
                row.update({k: int(m[k]) for k in ("tp", "fp", "fn", "tn")})
            row.update(public[group(node)][1])
            report.clients[node] = row
            seconds = float(scored[node]["seconds"])
            say(f"  site {node}: scored {row['total']} records in {seconds:.1f} s, kept {row['kept']}")
        self._enough(len(report.clients), "threshold")
        report.warnings += guards(report.clients, ratio)
        for warning in report.warnings:
            say(f"warning: {warning}")
        summary = report.to_json()
        if "f1" in summary:
            say(
                "selection (positive = clean): precision {precision:.1f}, recall {recall:.1f}, "
                "F1 {f1:.1f}, accuracy {accuracy:.1f}".format(**summary)
            )

    def _fit_threshold(self, histograms: list[list[int]], info: dict, report: SelectionReport) -> float:
        """The histogram rule's τ; the anchor-quantile τ, with a warning, when the fit cannot place one."""
        fallback = threshold(info["anchor-scores"], "anchor-quantile", self.selection.target_recall)
        edges, anchor_scores = info["histogram-edges"], info["anchor-scores"]
        tau, note = histogram_threshold(histograms, edges, anchor_scores, self.selection.histogram_fit, fallback)
        if note:
            report.warnings.append(f"{note} (anchor-quantile, target recall {self.selection.target_recall})")
        return tau

    # ---- helpers ----------------------------------------------------------------------

    def _nodes(self, grid: Grid) -> list[int]:
        nodes, _ = sample_nodes(grid, self.min_available_nodes, len(list(grid.get_node_ids())))
        return list(nodes)

    def _enough(self, count: int, phase: str) -> None:
        if count < self.min_train_nodes:
            raise RuntimeError(f"{phase}: {count} client(s) replied, min-train-nodes is {self.min_train_nodes}")

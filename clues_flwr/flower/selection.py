"""The CLUES selection stage: trace, score, one global standard; a report of what was kept.

``CluesSelection.run`` works on any Flower ``Grid``, alone (selection only) or in front of
any Flower strategy that then tunes on the selected records (``tuning.CluesTuning``):

- *trace* (``mode="federated"``): ``trace-rounds`` FedAvg rounds on all records, run by
  Flower's own ``Strategy.start`` (``TraceStrategy``). Each round's global adapter, with the
  clients' scoring-layer AdamW moments averaged by examples, is a checkpoint, so client and
  anchor scores live in one geometry.
- *trace* (``mode="merge"``, the paper's model-merging setting): every client traces alone
  and uploads its trajectory. Its scores then live in its own geometry, so the server scores
  the anchors on each client's trajectory and sends that client its own τ: the standard stays
  global (the same public anchors and rule), each τ measured with the client's own ruler.
- *score*: the server computes the validation sums G_t and the anchor scores, fixes the
  standard (``core.threshold.standard``), and sends ``query.clues_score``; every site scores
  its records and answers with a histogram. The server sets τ (``core.threshold.
  global_threshold``) and sends ``query.clues_threshold``; sites keep S(z) ≥ τ on the node and
  answer with counts only.
- the paper's baselines (``selection`` perplexity, ifd, datainf, random) skip the trace:
  sites and anchors are scored at the initial adapter, then the same rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from clues_flwr.config import FederationConfig, SelectionConfig, TuneConfig, to_record
from clues_flwr.core.aggregation import fedavg
from clues_flwr.core.combine import combined, references
from clues_flwr.core.data import Record, check_max_len, prompt_format
from clues_flwr.core.metrics import selection_scores
from clues_flwr.core.scoring import ScoreConfig, left_out_scores
from clues_flwr.core.scoring import scores as clues_scores
from clues_flwr.core.signals import datainf_direction, signal_scores
from clues_flwr.core.threshold import Standard, counts_problem, global_threshold, guards, histogram_problem, standard
from clues_flwr.core.train import TrainConfig
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.flower.client import LABEL_KEY
from clues_flwr.flower.exchange import Failures, adapter_check, exchange, usable, wait_for_nodes
from clues_flwr.flower.log import say, without_final_results
from clues_flwr.flower.messages import (
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
from clues_flwr.flower.state import RunFolder
from clues_flwr.model import set_adapter_state


@dataclasses.dataclass(frozen=True)
class PublicRecords:
    """What the server holds to score the public records itself: a PEFT model, its
    tokenizer, the public validation set (G_t, DataInf's direction), the anchors, and any
    more clean records a user adds (``clean``). All of them are the clean reference every
    signal is standardised against and every fallback τ is set from."""

    model: Any
    tokenizer: Any
    validation: list[Record]
    anchors: list[Record]
    clean: list[Record] = dataclasses.field(default_factory=list)

    @property
    def reference(self) -> list[Record]:
        """The clean reference: validation, anchors, then the added records, in that order."""
        return [*self.validation, *self.anchors, *self.clean]

    @property
    def anchor_slice(self) -> slice:
        return slice(len(self.validation), len(self.validation) + len(self.anchors))

    def clues(self, trajectory: list[Checkpoint], score: ScoreConfig) -> tuple[list[torch.Tensor], torch.Tensor]:
        """G_t per checkpoint and the reference's CLUES scores along ``trajectory`` (each
        validation record with itself left out of G_t)."""
        val_sums, own = left_out_scores(self.model, self.tokenizer, self.validation, trajectory, score)
        others = clues_scores(self.model, self.tokenizer, [*self.anchors, *self.clean], trajectory, val_sums, score)
        return val_sums, torch.cat([own, others])

    def baseline(self, methods: list[str], adapter: dict, score: ScoreConfig, seed: int):
        """The reference's scores by each baseline signal at ``adapter``, and DataInf's
        direction (else None)."""
        set_adapter_state(self.model, adapter)
        sizes = {"batch_size": score.batch_size, "max_len": score.max_len}
        direction = (
            datainf_direction(self.model, self.tokenizer, self.validation, **sizes) if "datainf" in methods else None
        )
        scored = signal_scores(
            methods, self.model, self.tokenizer, self.reference, seed=seed, direction=direction, **sizes
        )
        return scored, direction


@dataclasses.dataclass
class Anchors:
    """The server's side of one trajectory (or of the initial adapter, for baselines): per
    signal the reference's scores and their (mean, spread), and the standard fixed from them."""

    trajectory: list[Checkpoint] | None
    val_sums: list[torch.Tensor] | None
    scores: dict[str, torch.Tensor]  # per signal, over the reference records
    direction: torch.Tensor | None
    standard: Standard

    @property
    def stats(self) -> dict[str, tuple[float, float]]:
        """Each signal's reference mean and spread: all a site is sent to standardise by."""
        return references(self.scores)

    def public(self) -> dict:
        """As the run state keeps it: what a resumed run needs not to score the reference again."""
        return {"reference-scores": {n: s.tolist() for n, s in self.scores.items()}, "standard": self.standard.row()}


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
        Per node: ``site`` (its number, 1…n), ``kept``, ``total``, the score histogram, τ, the
        histogram edges, the anchor scores and, for labelled records, ``tp fp fn tn``.
    trace : dict[int, dict]
        The trace rounds' aggregated metrics.
    failures : Failures
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
    failures: Failures = dataclasses.field(default_factory=Failures)
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
            "failures": list(self.failures),
        }

    @classmethod
    def of(cls, selection: SelectionConfig, state: dict[str, Any] | None = None) -> "SelectionReport":
        """The report for ``selection``: empty, or as a run state saved it."""
        report = cls(selection.method, selection.threshold_rule, selection.target_recall, selection.keep_ratio)
        if state:
            report.clients = {int(n): row for n, row in state["selection"].get("clients", {}).items()}
            report.trace = {int(r): m for r, m in state["trace"].items()}
            report.failures.extend(state["failures"])
            report.failures.names.update({n: row["site"] for n, row in report.clients.items() if "site" in row})
            report.warnings = list(state["selection"].get("warnings", []))
        return report

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


class TraceStrategy(FedAvg):
    """FedAvg on all records whose rounds make the global trajectory; run by Flower's
    ``start``. Clients answer ``train.clues_trace`` with their adapter and the scoring
    layer's moments; each round's aggregate and the example-weighted mean of the moments
    are a checkpoint.

    Parameters
    ----------
    failures : Failures
        Where unusable replies are reported.
    train : TrainConfig
        The trace rounds' hyperparameters (the checkpoints' learning rate and weight decay).
    **fedavg_kwargs
        FedAvg's own (sampling, minimum nodes).
    """

    def __init__(self, failures: Failures, train: TrainConfig, **fedavg_kwargs: Any):
        super().__init__(**fedavg_kwargs)
        self.failures, self.train = failures, train
        self.trajectory: list[Checkpoint] = []
        self._global: dict[str, torch.Tensor] = {}
        self._sent: list[Message] = []

    def summary(self) -> None:
        say(f"trace: FedAvg on every record, {self.train.local_steps} local step(s) a round")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return []  # a trace round only trains: the trajectory is what it is for

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        return None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._global = arrays.to_torch_state_dict()
        messages = super().configure_train(server_round, arrays, config, grid)
        self._sent = [
            Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=TRACE_MESSAGE) for m in messages
        ]
        return self._sent

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        where = f"trace round {server_round}"
        check = adapter_check(self._global, self.weighted_by_key)
        valid = [m.content for _, m in usable(replies, self._sent, where, self.failures, check)]
        if len(valid) < self.min_train_nodes:
            self.failures.add(where, None, f"only {len(valid)} usable replies, {self.min_train_nodes} needed")
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
    sets τ by one global standard, and returns a ``SelectionReport``; each site keeps its
    selection on the node for its own training handler (``selected_records``).

    Parameters
    ----------
    public : PublicRecords
        The server's model and public records, with which it scores the anchors.
    score, selection, train, tune, federation
        The run's config sections: how to score, what to select and by which rule, the
        sites' local training in the trace rounds, the trace's layout (``tune.mode``), and
        how many sites to wait for and how long.
    """

    def __init__(
        self,
        public: PublicRecords,
        *,
        score: ScoreConfig = ScoreConfig(),
        selection: SelectionConfig = SelectionConfig(),
        train: TrainConfig = TrainConfig(),
        tune: TuneConfig = TuneConfig(),
        federation: FederationConfig = FederationConfig(),
    ):
        if selection.method in ("none", "oracle"):
            raise ValueError(f"selection {selection.method!r} has no score phase: tune on every record or by label")
        if score.max_len != train.max_seq_len:
            raise ValueError(
                f"max-seq-len differs between scoring ({score.max_len}) and training ({train.max_seq_len}): "
                "records would be scored on other tokens than they were traced and tuned on"
            )
        check_max_len(public.validation, public.tokenizer, train.max_seq_len)
        self.public = public
        self.score, self.selection, self.train, self.mode, self.federation = (
            score,
            selection,
            train,
            tune.mode,
            federation,
        )
        self.signals = selection.method.split("+")
        self.anchors: Anchors | None = None  # a federated trajectory's public side, for the run state

    @classmethod
    def from_public(
        cls,
        model,
        tokenizer,
        validation: list[Record],
        anchors: list[Record],
        clean: list[Record] = (),
        **sections: Any,
    ):
        """The stage for a server that holds ``model`` (a PEFT model), the public
        ``validation`` and ``anchors`` records and, optionally, more public ``clean`` ones
        for the reference; ``sections`` are the config sections."""
        return cls(PublicRecords(model, tokenizer, list(validation), list(anchors), list(clean)), **sections)

    def run(self, grid: Grid, initial_arrays: ArrayRecord, folder: RunFolder | None = None) -> SelectionReport:
        """Select on every site. With ``folder``, a federated trajectory and its public side
        are saved before the score phase, and a saved one is scored again (a site's
        selection lives on the node for one run only) without tracing or scoring the
        anchors anew."""
        saved = folder.saved if folder else None
        report = SelectionReport.of(self.selection, saved.report if saved else None)
        report.clients, report.warnings = {}, []
        nodes = wait_for_nodes(grid, self.federation.min_available_nodes, self.federation.round_timeout)
        report.failures.names.update({node: f"site {i}" for i, node in enumerate(nodes, start=1)})
        initial = initial_arrays.to_torch_state_dict()
        if "clues" not in self.signals:
            say(f"score: {self.selection.method} at the initial adapter (no trace)")
            sides = {None: self._anchors(initial, None)}
        elif saved and saved.public:
            say("resume: scoring again on the saved trajectory and anchor scores")
            trajectory, val_sums = folder.trajectory()
            scores = {n: torch.tensor(s, dtype=torch.float64) for n, s in saved.public["reference-scores"].items()}
            sides = {None: Anchors(trajectory, val_sums, scores, None, Standard.from_row(saved.public["standard"]))}
        else:
            traced = self.trace(grid, initial_arrays, report)
            sides = {key: self._anchors(initial, trajectory) for key, trajectory in traced.items()}
            if folder and None in sides:
                side = sides[None]
                folder.save_trajectory(side.trajectory, side.val_sums)
                folder.save(0, side.public(), report.to_state())
        self.anchors = sides.get(None)
        self._score(grid, initial_arrays, sides, report)
        return report

    # ---- trace ------------------------------------------------------------------------

    def _base(self) -> dict:
        return {**to_record(self.train), "score-layer": self.score.layer, "score-modules": list(self.score.modules)}

    def trace(
        self, grid: Grid, initial_arrays: ArrayRecord, report: SelectionReport | None = None
    ) -> dict[int | None, list[Checkpoint]]:
        """The trajectory every site is scored on (key None), or in merge mode each site's
        own (keyed by node); the trace rounds' metrics and failures go into ``report``.
        Experiment drivers call it alone to score many variants on the app's own trace."""
        report = report if report is not None else SelectionReport.of(self.selection)
        rounds, fed = self.selection.trace_rounds, self.federation
        if self.mode == "federated":
            say(f"trace: {rounds} federated round(s) on all data")
            strategy = TraceStrategy(
                report.failures,
                self.train,
                fraction_train=fed.fraction_train,
                min_train_nodes=fed.min_train_nodes,
                min_available_nodes=fed.min_available_nodes,
            )
            config = ConfigRecord({**self._base(), "phase": "trace"})
            with without_final_results():
                result = strategy.start(grid, initial_arrays, rounds, fed.round_timeout, config)
            report.trace = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
            if not strategy.trajectory:
                raise RuntimeError("trace: no round aggregated, so there is no trajectory to score on")
            return {None: strategy.trajectory}
        say(f"trace: every client traces {rounds} checkpoint(s) alone (merge mode)")
        config = ConfigRecord({**self._base(), "phase": "trace-local", "trace-rounds": rounds, "server-round": 0})
        content = RecordDict({"arrays": initial_arrays, "config": config})
        messages = [Message(content, dst_node_id=n, message_type=TRACE_MESSAGE) for n in self._nodes(grid)]
        check = adapter_check(initial_arrays.to_torch_state_dict(), "num-examples")
        replies = exchange(grid, messages, "trace", report.failures, **self._phase(), check=check)
        return {node: trajectory_from(content)[0] for node, content in replies.items()}

    # ---- score ------------------------------------------------------------------------

    def _anchors(self, initial: dict[str, torch.Tensor], trajectory: list[Checkpoint] | None) -> Anchors:
        """The reference's scores by every signal, and the standard fixed from them. CLUES
        scores along ``trajectory``; the other signals at the adapter every site starts from,
        as the paper applies the baselines before any training (DataInf's direction comes
        from the public validation set, so sites and the server share it)."""
        val_sums, scores = None, {}
        others = [n for n in self.signals if n != "clues"]
        baseline, direction = (
            self.public.baseline(others, initial, self.score, self.train.seed) if others else ({}, None)
        )
        for name in self.signals:
            if name == "clues":
                val_sums, scores[name] = self.public.clues(trajectory, self.score)
            else:
                scores[name] = baseline[name]
        return Anchors(trajectory, val_sums, scores, direction, self._standard(scores))

    def _standard(self, scores: dict[str, torch.Tensor]) -> Standard:
        sel = self.selection
        stats = references(scores) if len(scores) > 1 else {}
        reference = combined(scores, stats, sel.combination)
        anchors = reference[self.public.anchor_slice]
        return standard(anchors, reference, self._rule(), sel.target_recall, sel.histogram_bins)

    def _content(self, initial_arrays: ArrayRecord, side: Anchors) -> RecordDict:
        """What a site is sent to score with: per signal what it scores with, the histogram
        edges and, for a combination, each signal's reference mean and spread (its scale)."""
        content, config = RecordDict(), {}
        for name in self.signals:
            if name == "clues":
                for key, record in trajectory_records(side.trajectory, side.val_sums).items():
                    content[key] = record
                content[SCORE_CONFIG_KEY] = ConfigRecord(to_record(self.score))
                continue
            content["arrays"] = initial_arrays
            if side.direction is not None:
                content[DIRECTION_KEY] = ArrayRecord({"u": side.direction.float().contiguous()})
            config.update(
                {"batch-size": self.score.batch_size, "max-seq-len": self.score.max_len}, seed=self.train.seed
            )
        if len(self.signals) > 1:
            config.update({f"reference-{n}": list(stats) for n, stats in side.stats.items()})
        config.update(
            {
                "method": self.selection.method,
                "combination": self.selection.combination,
                "histogram-edges": side.standard.edges,
                "prompt-format": prompt_format(self.public.anchors),
            }
        )
        content["config"] = ConfigRecord(config)
        return content

    def _score(
        self, grid: Grid, initial_arrays: ArrayRecord, sides: dict[int | None, Anchors], report: SelectionReport
    ) -> None:
        """Two queries: every site scores its records and sends a histogram; the server sets
        τ (by the anchors, or from the pooled histograms), then every site keeps S(z) ≥ τ (or
        its top ``keep-ratio``) and sends counts."""
        shared = None in sides

        def side_of(node: int) -> int | None:
            return None if shared else node

        nodes = self._nodes(grid) if shared else list(sides)
        contents = {key: self._content(initial_arrays, side) for key, side in sides.items()}
        messages = [Message(contents[side_of(n)], dst_node_id=n, message_type=SCORE_MESSAGE) for n in nodes]
        say(f"score: {self.selection.method} on {len(nodes)} site(s)")
        sel = self.selection
        rule = self._rule()
        bins = sel.histogram_bins if rule == "histogram" else 0

        def histogram_reply(node: int, content: RecordDict) -> str | None:
            m = content["metrics"]
            return histogram_problem(m.get("histogram"), m.get("total"), m.get("non-finite"), bins)

        scored = exchange(grid, messages, "score", report.failures, **self._phase(), check=histogram_reply)
        for node, content in scored.items():
            if LABEL_KEY in content:
                report.failures.names[node] = f"site {content[LABEL_KEY][LABEL_KEY]}"
        taus, applied = {}, {}
        for key, side in sides.items():
            fitted = [n for n in scored if side_of(n) == key]
            if fitted:
                histograms = [list(scored[n]["metrics"]["histogram"]) for n in fitted]
                tau, used, note = global_threshold(
                    side.standard, histograms, rule, sel.histogram_fit, sel.target_recall
                )
                taus[key] = tau
                applied[key] = {"rule": used, "fitted-on": [report.failures.names[n] for n in fitted] if bins else []}
                if note:
                    report.warnings.append(note)
        shown = sorted({round(t, 6) for t in taus.values() if t is not None})
        used = sorted({a["rule"] for a in applied.values()})
        say(
            f"score: each site keeps its top {sel.keep_ratio:.0%}"
            if sel.keep_ratio
            else f"score: threshold τ = {', '.join(f'{t:.4g}' for t in shown)} ({', '.join(used)}); "
            "every site applies it"
        )

        def threshold_config(node: int) -> ConfigRecord:
            tau = taus[side_of(node)]
            return ConfigRecord({"keep-ratio": sel.keep_ratio, **({} if tau is None else {"threshold": tau})})

        messages = [
            Message(RecordDict({"config": threshold_config(n)}), dst_node_id=n, message_type=THRESHOLD_MESSAGE)
            for n in scored
        ]
        totals = {n: scored[n]["metrics"]["total"] for n in scored}

        def counts_reply(node: int, content: RecordDict) -> str | None:
            return counts_problem(content["metrics"], totals[node])

        kept = exchange(grid, messages, "threshold", report.failures, **self._phase(), check=counts_reply)
        for node, content in kept.items():
            m, score_metrics = content["metrics"], scored[node]["metrics"]
            name = report.failures.names[node]
            row = {"site": name, "kept": int(m["kept"]), "total": int(m["total"])}
            row["histogram"] = list(score_metrics["histogram"])
            row["non-finite"] = int(score_metrics["non-finite"])
            row["dp-epsilon"] = float(score_metrics["dp-epsilon"])
            if "tp" in m:
                row.update({k: int(m[k]) for k in ("tp", "fp", "fn", "tn")})
            row.update(sides[side_of(node)].standard.row(), threshold=taus[side_of(node)], **applied[side_of(node)])
            report.clients[node] = row
            seconds = float(score_metrics["seconds"])
            say(f"  {name}: scored {row['total']} records in {seconds:.1f} s, kept {row['kept']}")
            if score_metrics["prompt-mismatch"]:
                report.warnings.append(
                    f"{name}: its records' prompts are formatted otherwise than the server's public records' "
                    f"({prompt_format(self.public.anchors)} here): its scores and τ are not on one scale"
                )
        report.warnings += guards(report.clients, sel.keep_ratio)
        for warning in report.warnings:
            say(f"warning: {warning}")
        summary = report.to_json()
        if "f1" in summary:
            say(
                "selection (positive = clean): precision {precision:.1f}, recall {recall:.1f}, "
                "F1 {f1:.1f}, accuracy {accuracy:.1f}".format(**summary)
            )

    # ---- helpers ----------------------------------------------------------------------

    def _rule(self) -> str:
        """The rule the score phase applies: a set keep ratio decides alone."""
        return "keep-ratio" if self.selection.keep_ratio else self.selection.threshold_rule

    def _phase(self) -> dict:
        return {"timeout": self.federation.round_timeout, "least": self.federation.min_train_nodes}

    def _nodes(self, grid: Grid) -> list[int]:
        nodes, _ = sample_nodes(grid, self.federation.min_available_nodes, len(list(grid.get_node_ids())))
        return list(nodes)

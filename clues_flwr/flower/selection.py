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

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from clues_flwr.config import FederationConfig, SelectionConfig, TuneConfig
from clues_flwr.core.adapter import adapter_state, set_adapter_state
from clues_flwr.core.combine import combined, references
from clues_flwr.core.data import Record, check_max_len, prompt_format
from clues_flwr.core.scoring import ScoreConfig
from clues_flwr.core.threshold import Standard, global_threshold, standard
from clues_flwr.core.train import TrainConfig
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.flower.exchange import exchange, wait_for_nodes
from clues_flwr.flower.log import say, without_final_results
from clues_flwr.flower.protocol import (
    SCORE_MESSAGE,
    THRESHOLD_MESSAGE,
    TRACE_MESSAGE,
    ScoreReply,
    ScoreRequest,
    ThresholdReply,
    ThresholdRequest,
    TraceReply,
    TraceRequest,
)
from clues_flwr.flower.reference import Reference, ReferenceScores
from clues_flwr.flower.report import SelectionReport, guards
from clues_flwr.flower.trace import TraceStrategy


class CluesSelection:
    """The selection stage on a Grid: ``run`` traces (CLUES) or not (baselines), scores,
    sets τ by one global standard, and returns a ``SelectionReport``; each site keeps its
    selection on the node for its own training handler (``selected_records``).

    Parameters
    ----------
    reference : Reference
        The server's model and clean public records, which it scores itself. ``run`` leaves
        the model's adapter as it found it.
    score, selection, train, tune, federation
        The run's config sections: how to score, what to select and by which rule, the
        sites' local training in the trace rounds, the trace's layout (``tune.mode``), and
        how many sites to wait for and how long.
    """

    def __init__(
        self,
        reference: Reference,
        *,
        score: ScoreConfig = ScoreConfig(),
        selection: SelectionConfig = SelectionConfig(),
        train: TrainConfig = TrainConfig(),
        tune: TuneConfig = TuneConfig(),
        federation: FederationConfig = FederationConfig(),
    ):
        if selection.selection in ("none", "oracle"):
            raise ValueError(f"selection {selection.selection!r} has no score phase: tune on every record or by label")
        check_max_len(reference.validation, reference.tokenizer, train.max_seq_len)
        self.reference = reference
        self.score, self.selection, self.train, self.mode, self.federation = (
            score,
            selection,
            train,
            tune.mode,
            federation,
        )
        self.signals = selection.selection.split("+")
        self.reference_scores: ReferenceScores | None = None  # a federated trajectory's, for the run state

    @classmethod
    def from_records(
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
        return cls(Reference(model, tokenizer, list(validation), list(anchors), list(clean)), **sections)

    def run(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        *,
        report: SelectionReport | None = None,
        resume: ReferenceScores | None = None,
        on_trace: Callable[[ReferenceScores, SelectionReport], None] | None = None,
    ) -> SelectionReport:
        """Select on every site, and return the report (``report`` continued when given: an
        earlier run's trace metrics and failures). ``on_trace`` gets a federated trajectory's
        reference scores before the score phase, so that a crashed run can be resumed; a run
        given them back as ``resume`` scores again on them (a site's selection lives on the
        node for one run only) without tracing or scoring the reference anew. The reference
        model's adapter is restored when it returns."""
        adapter = adapter_state(self.reference.model)
        try:
            return self._run(grid, initial_arrays, report or SelectionReport.of(self.selection), resume, on_trace)
        finally:
            set_adapter_state(self.reference.model, adapter)

    def _run(self, grid, initial_arrays, report, resume, on_trace) -> SelectionReport:
        report.clients, report.warnings = {}, []
        self._nodes(grid)  # enough sites, within the round timeout, before the first phase
        initial = initial_arrays.to_torch_state_dict()
        if "clues" not in self.signals:
            say(f"score: {self.selection.selection} at the initial adapter (no trace)")
            sides = {None: self._reference_scores(initial, None)}
        elif resume is not None:
            say("resume: scoring again on the saved trajectory and reference scores")
            sides = {None: resume}
        else:
            traced = self.trace(grid, initial_arrays, report)
            sides = {key: self._reference_scores(initial, trajectory) for key, trajectory in traced.items()}
            if on_trace and None in sides:
                on_trace(sides[None], report)
        self.reference_scores = sides.get(None)
        self._score(grid, initial_arrays, sides, report)
        return report

    # ---- trace ------------------------------------------------------------------------

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
            initial = initial_arrays.to_torch_state_dict()
            config = TraceRequest(initial, self.train, self.score, "trace", 0).encode()["config"]
            with without_final_results():
                result = strategy.start(grid, initial_arrays, rounds, fed.round_timeout, config)
            report.trace = {r: dict(m) for r, m in result.train_metrics_clientapp.items()}
            if not strategy.trajectory:
                raise RuntimeError("trace: no round aggregated, so there is no trajectory to score on")
            return {None: strategy.trajectory}
        say(f"trace: every client traces {rounds} checkpoint(s) alone (merge mode)")
        initial = initial_arrays.to_torch_state_dict()
        content = TraceRequest(initial, self.train, self.score, "trace-local", 0, rounds).encode()
        messages = [Message(content, dst_node_id=n, message_type=TRACE_MESSAGE) for n in self._nodes(grid)]
        decode = lambda node, c: TraceReply.decode(c, initial, local=True)  # noqa: E731
        replies = exchange(grid, messages, "trace", report.failures, decode, **self._phase())
        report.failures.learn({node: reply.label for node, reply in replies.items()})
        return {node: reply.trajectory for node, reply in replies.items()}

    # ---- score ------------------------------------------------------------------------

    def _reference_scores(
        self, initial: dict[str, torch.Tensor], trajectory: list[Checkpoint] | None
    ) -> ReferenceScores:
        """The reference's scores by every signal, and the standard fixed from them. CLUES
        scores along ``trajectory``; the other signals at the adapter every site starts from,
        as the paper applies the baselines before any training (DataInf's direction comes
        from the public validation set, so sites and the server share it)."""
        val_sums, scores, direction = self.reference.scored(
            self.signals, initial, trajectory, self.score, self.train.max_seq_len, self.train.seed
        )
        return ReferenceScores(trajectory, val_sums, scores, direction, self._standard(scores))

    def _standard(self, scores: dict[str, torch.Tensor]) -> Standard:
        sel = self.selection
        stats = references(scores) if len(scores) > 1 else {}
        reference = combined(scores, stats, sel.combination)
        anchors = reference[self.reference.anchor_slice]
        return standard(anchors, reference, self.selection.rule, sel.target_recall, sel.histogram_bins)

    def _request(self, initial: dict[str, torch.Tensor], side: ReferenceScores) -> ScoreRequest:
        """What a site is sent to score with: per signal what it scores with, the histogram
        edges and, for a combination, each signal's reference mean and spread (its scale)."""
        clues, others = "clues" in self.signals, any(n != "clues" for n in self.signals)
        return ScoreRequest(
            self.signals,
            self.selection.combination,
            side.standard.edges,
            prompt_format(self.reference.anchors),
            self.score,
            self.train.max_seq_len,
            side.stats if len(self.signals) > 1 else {},
            trajectory=side.trajectory if clues else None,
            val_sums=side.val_sums if clues else None,
            adapter=initial if others else None,
            direction=side.direction,
            seed=self.train.seed,
        )

    def _score(
        self, grid: Grid, initial_arrays: ArrayRecord, sides: dict[int | None, ReferenceScores], report: SelectionReport
    ) -> None:
        """Two queries: every site scores its records and sends a histogram; the server sets
        τ (by the anchors, or from the pooled histograms), then every site keeps S(z) ≥ τ (or
        its top ``keep-ratio``) and sends counts. Every reply is decoded, and one that does not
        decode is that site's failure. ``sides`` is keyed None (one trajectory for all) or by
        node (merge mode: each site's own)."""
        scored = self._score_query(grid, initial_arrays, sides, report)
        taus, applied = self._thresholds(scored, sides, report)
        kept = self._threshold_query(grid, scored, taus, sides, report)
        for node, reply in kept.items():
            side, score, name = _side(sides, node), scored[node], report.failures.name(node)
            row = {"site": name, "kept": reply.kept, "total": reply.total, **score.row(), **(reply.confusion or {})}
            row.update(sides[side].standard.row(), threshold=taus[side], **applied[side])
            report.clients[node] = row
            took = f" in {score.seconds:.1f} s" if score.seconds is not None else ""
            say(f"  {name}: scored {row['total']} records{took}, kept {row['kept']}")
            if score.prompt_mismatch:
                report.warnings.append(
                    f"{name}: its records' prompts are formatted otherwise than the server's public records' "
                    f"({prompt_format(self.reference.anchors)} here): its scores and τ are not on one scale"
                )
        report.warnings += guards(report.clients, self.selection.keep_ratio)
        for warning in report.warnings:
            say(f"warning: {warning}")
        report.say_scores()

    def _score_query(self, grid, initial_arrays, sides, report) -> dict[int, ScoreReply]:
        nodes = self._nodes(grid) if None in sides else list(sides)
        initial = initial_arrays.to_torch_state_dict()
        contents = {key: self._request(initial, side).encode() for key, side in sides.items()}
        messages = [Message(contents[_side(sides, n)], dst_node_id=n, message_type=SCORE_MESSAGE) for n in nodes]
        say(f"score: {self.selection.selection} on {len(nodes)} site(s)")
        bins = self._bins()
        decode = lambda node, content: ScoreReply.decode(content, bins)  # noqa: E731
        scored = exchange(grid, messages, "score", report.failures, decode, **self._phase())
        report.failures.learn({node: reply.label for node, reply in scored.items()})
        return scored

    def _thresholds(self, scored: dict[int, ScoreReply], sides, report) -> tuple[dict, dict]:
        """τ per side, fitted on the histograms of the sites scored on it, and the rule used."""
        sel, taus, applied = self.selection, {}, {}
        for key, side in sides.items():
            fitted = [n for n in scored if _side(sides, n) == key]
            if fitted:
                histograms = [scored[n].histogram for n in fitted]
                tau, used, note = global_threshold(
                    side.standard, histograms, sel.rule, sel.histogram_fit, sel.target_recall
                )
                taus[key] = tau
                names = [report.failures.name(n) for n in fitted] if self._bins() else []
                applied[key] = {"rule": used, "fitted-on": names}
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
        return taus, applied

    def _threshold_query(self, grid, scored: dict[int, ScoreReply], taus, sides, report) -> dict[int, ThresholdReply]:
        messages = [
            Message(
                ThresholdRequest(taus[_side(sides, n)], self.selection.keep_ratio).encode(),
                dst_node_id=n,
                message_type=THRESHOLD_MESSAGE,
            )
            for n in scored
        ]
        decode = lambda node, content: ThresholdReply.decode(content, scored[node].total)  # noqa: E731
        return exchange(grid, messages, "threshold", report.failures, decode, **self._phase())

    # ---- helpers ----------------------------------------------------------------------

    def _bins(self) -> int:
        """The histogram's bins a score query asks for: none unless the rule fits one."""
        return self.selection.histogram_bins if self.selection.rule == "histogram" else 0

    def _phase(self) -> dict:
        return {"timeout": self.federation.round_timeout, "least": self.federation.min_train_nodes}

    def _nodes(self, grid: Grid) -> list[int]:
        return wait_for_nodes(grid, self.federation.min_available_nodes, self.federation.round_timeout)


def _side(sides: dict[int | None, ReferenceScores], node: int) -> int | None:
    """The key of the side ``node`` was scored on: None when one trajectory serves all."""
    return None if None in sides else node

"""Tuning on what the selection kept, through Flower's own ``Strategy.start``.

``CluesTuning`` wraps any Flower strategy (FedAvg, FedProx, FedAdam, FedYogi, FedAvgM, or a
project's own) the way FedProx extends FedAvg: its ``configure_train`` adds the selection
flag ``clues-selection`` to each round's config (clients train on ``selected_records``) and
leaves out sites that were not scored; its ``aggregate_train`` drops unusable replies (errors,
non-finite or misshapen adapters, sites that kept nothing) and hands the rest to the wrapped
strategy's own aggregation. Flower's round loop, logs and ``summary()`` stay. A wrapper
rather than a mixin, because a project already holds an instance of its strategy, configured
its own way; wrapping it needs no new class.

``FedTies``, ``FedTaskArithmetic`` and ``FedExact`` are FedAvg with the aggregation of
``clues_flwr.core.aggregation`` (TIES on updates, the paper's eqs. 9-10, exact ΔW), usable in
any Flower project on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from clues_flwr.config import FederationConfig, TuneConfig
from clues_flwr.core.aggregation import aggregate
from clues_flwr.flower.exchange import uniform, usable
from clues_flwr.flower.log import say
from clues_flwr.flower.protocol import (
    CLEAN_EXAMPLES_KEY,
    CLEAN_LOSS_KEY,
    MAX_RECORDS,
    decode_evaluate_reply,
    decode_train_reply,
    tuning_config,
)
from clues_flwr.flower.report import SelectionReport


class _Merged(FedAvg):
    """FedAvg whose arrays are merged by one of ``aggregation.AGGREGATIONS``."""

    method = "fedavg"
    density: float | None = None  # TIES alone trims

    def __init__(self, **fedavg_kwargs: Any):
        super().__init__(**fedavg_kwargs)
        self._global: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._global = arrays.to_torch_state_dict()  # TIES and exact ΔW merge updates from it
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        states = [c[self.arrayrecord_key].to_torch_state_dict() for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        merged = aggregate(self.method, states, weights, base=self._global, density=self.density)
        return ArrayRecord(merged), self.train_metrics_aggr_fn(contents, self.weighted_by_key)


class FedTies(_Merged):
    """FedAvg with TIES-merging of the clients' updates (trim to ``ties_density``, elect
    signs, average the agreeing entries).

    Parameters
    ----------
    ties_density : float
        Share of each update's entries kept (by magnitude) before the sign election.
    **fedavg_kwargs
        FedAvg's own (sampling, minimum nodes, ``weighted_by_key``).
    """

    method = "ties"

    def __init__(self, *, ties_density: float, **fedavg_kwargs: Any):
        super().__init__(**fedavg_kwargs)
        self.density = ties_density


class FedTaskArithmetic(_Merged):
    """The CLUES paper's one-shot LoRA merge (eqs. 9-10): √w on A and B. Meant for one
    round; applied every round it compounds (n equal sites scale B·A by n per round)."""

    method = "task-arithmetic"


class FedExact(_Merged):
    """Mean of the clients' B·A, refactored to rank r: the exact ΔW average."""

    method = "exact"


STRATEGIES = {"fedavg": FedAvg, "ties": FedTies, "task-arithmetic": FedTaskArithmetic, "exact": FedExact}


def _setting(strategy: Strategy, name: str, default: Any) -> Any:
    """A setting of the strategy, or of the one it wraps: Flower's DP wrappers keep the
    inner strategy (and its ``weighted_by_key``) in ``.strategy``."""
    while not hasattr(strategy, name) and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return getattr(strategy, name, default)


class CluesTuning(Strategy):
    """Any Flower strategy, tuning on the records the CLUES selection kept.

    Parameters
    ----------
    strategy : Strategy
        The strategy that tunes (its own sampling, aggregation and evaluation).
    report : SelectionReport
        The selection stage's report: its selection, sent as ``clues-selection``, the sites that
        hold a selection (others are left out of tuning), and where failures are reported.
        ``SelectionReport.of(SelectionConfig(selection="none"))`` (or ``"oracle"``) tunes every
        site without a score phase.
    first_round : int, optional
        The true number of Flower's first round: a resumed run continues where it stopped, and
        the wrapped strategy and the sites see the true round numbers.
    evaluate_due : Callable[[int], bool], optional
        Whether the sites evaluate after a (true) round; every round without it.
    on_metrics : Callable[[str, int, MetricRecord | None], None], optional
        Called with ``"train"`` or ``"evaluate"``, the true round and its aggregated metrics:
        where a run keeps its history.
    """

    def __init__(
        self,
        strategy: Strategy,
        report: SelectionReport,
        *,
        first_round: int = 1,
        evaluate_due: Callable[[int], bool] | None = None,
        on_metrics: Callable[[str, int, MetricRecord | None], None] | None = None,
    ):
        self.strategy, self.report = strategy, report
        self.first_round, self.evaluate_due, self.on_metrics = first_round, evaluate_due, on_metrics
        self.weighted_by_key = _setting(strategy, "weighted_by_key", "num-examples")
        self.min_train_nodes = _setting(strategy, "min_train_nodes", 1)
        self._global: dict[str, torch.Tensor] = {}
        self._sent: list[Message] = []
        self._sent_evaluate: list[Message] = []
        self._aggregated, self._configured = 0, 0
        self._unweighted: set[int] = set()  # sites that sent no held-out loss, noted once

    def summary(self) -> None:
        first = self.first_round
        say(
            f"tune: {self.report.selection} selection, then {type(self.strategy).__name__}"
            + (f", from round {first}" if first > 1 else "")
        )
        self.strategy.summary()

    def start(self, *args: Any, **kwargs: Any):
        """Flower's own loop; a run in which no tuning round aggregated ends with an error
        naming why (every reply an error: a site without a train handler, say), not a
        quiet "done" with the adapter unchanged."""
        self._aggregated, self._configured = 0, 0
        result = super().start(*args, **kwargs)
        if self._configured and not self._aggregated:
            tuning = [f for f in self.report.failures if f["where"].startswith("tune round")]
            reasons = sorted({f["reason"] for f in tuning})
            raise RuntimeError(
                f"no tuning round aggregated in {self._configured} round(s): "
                + ("; ".join(reasons) or "no site replied")
            )
        return result

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._configured += 1
        true_round = self._true(server_round)
        self._global = arrays.to_torch_state_dict()
        config = tuning_config(config, self.report.selection)
        messages = list(self.strategy.configure_train(true_round, arrays, config, grid))
        if self.report.clients:
            dropped = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.report.clients]
            if dropped:
                names = ", ".join(self.report.failures.name(n) for n in dropped)
                say(f"tune round {true_round}: {names} hold no selection and are left out")
            messages = [m for m in messages if m.metadata.dst_node_id in self.report.clients]
        self._sent = messages
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        true_round = self._true(server_round)
        where = f"tune round {true_round}"
        ok = usable(replies, self._sent, where, self.report.failures, self._decode_train)
        usable_replies = [m for _, m, weight in uniform(ok, where, self.report.failures) if weight > 0]
        if len(usable_replies) < self.min_train_nodes:
            self.report.failures.add(
                where,
                None,
                f"only {len(usable_replies)} usable replies, {self.min_train_nodes} needed: round not aggregated",
            )
            return None, None
        arrays, metrics = self.strategy.aggregate_train(true_round, usable_replies)
        if self.on_metrics:
            self.on_metrics("train", true_round, metrics)
        self._aggregated += arrays is not None
        return arrays, metrics

    def _true(self, flower_round: int) -> int:
        return flower_round + self.first_round - 1

    def _decode_train(self, node: int, content) -> int:
        """A tuning reply's weight, checked: at most the records the site said it scored."""
        most = int(self.report.clients.get(node, {}).get("total", MAX_RECORDS))
        return decode_train_reply(content, self._global, self.weighted_by_key, most)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        true_round = self._true(server_round)
        if self.evaluate_due and not self.evaluate_due(true_round):
            self._sent_evaluate = []  # Flower still calls aggregate_evaluate: nobody was asked, nobody is missing
            return []
        self._sent_evaluate = list(self.strategy.configure_evaluate(true_round, arrays, config, grid))
        return self._sent_evaluate

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The wrapped strategy's over the usable replies (an error or a site without held-out
        records is left out, the error reported), except the clean held-out loss: a mean over
        each site's clean held-out records, so weighted by their count."""
        true_round = self._true(server_round)
        where = f"evaluate round {true_round}"
        decode = lambda node, content: decode_evaluate_reply(content, self.weighted_by_key)  # noqa: E731
        ok = uniform(
            usable(replies, self._sent_evaluate, where, self.report.failures, decode), where, self.report.failures
        )
        for node, _, weight in ok:
            if not weight and node not in self._unweighted:
                self._unweighted.add(node)
                name = self.report.failures.name(node)
                self.report.warnings.append(
                    f"{name} sends no held-out loss (too few held-out records): not in the mean"
                )
                say(f"{where}: note: {self.report.warnings[-1]}")
        rows = [m for _, m, weight in ok if weight > 0]
        if not rows:
            return None
        metrics = self.strategy.aggregate_evaluate(true_round, rows)
        if metrics is not None and CLEAN_LOSS_KEY in metrics:
            clean = [r.content["metrics"] for r in rows]
            count = sum(int(m[CLEAN_EXAMPLES_KEY]) for m in clean)
            metrics[CLEAN_EXAMPLES_KEY] = count
            if count:
                metrics[CLEAN_LOSS_KEY] = (
                    sum(float(m[CLEAN_LOSS_KEY]) * int(m[CLEAN_EXAMPLES_KEY]) for m in clean) / count
                )
            else:
                del metrics[CLEAN_LOSS_KEY]
        if self.on_metrics:
            self.on_metrics("evaluate", true_round, metrics)
        return metrics


def tuning_strategy(tune: TuneConfig, federation: FederationConfig) -> FedAvg:
    """The FedAvg-family strategy the run config's ``aggregation`` names, sampling and
    waiting for sites as ``federation`` says."""
    cls = STRATEGIES[tune.aggregation]
    extra = {} if cls is FedAvg else {"ties_density": tune.ties_density}
    return cls(
        **extra,
        fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=federation.min_train_nodes,
        min_evaluate_nodes=federation.min_train_nodes,
        min_available_nodes=federation.min_available_nodes,
    )

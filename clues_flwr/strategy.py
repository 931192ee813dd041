"""The CLUES strategy: trace → score → global threshold → tuning on the selected data.

A subclass of Flower's FedAvg, usable in any Flower project whose clients register
``clues_flwr.client_app.CluesClient``:

- *trace* (``mode="federated"``): ``trace_rounds`` FedAvg rounds on all data. Each round's
  global adapter, with the clients' scoring-layer AdamW moments averaged by examples, is a
  checkpoint, so client and anchor scores live in one geometry.
- *trace* (``mode="merge"``, the paper's model-merging setting): every client traces alone
  and uploads its trajectory. A client's scores then live in its own geometry, and an
  anchor score from another geometry would not compare with them; so the server scores
  the anchors on each client's trajectory and sends that client its own τ. The standard
  stays global — the same public anchors and rule — while each τ is measured with the
  ruler the client's scores are measured with.
- *score*: the server computes the validation sums G_t and the anchor scores, derives τ by
  the threshold rule, and sends ``query.score`` with the trajectory, G_t, η_t and τ.
  Clients keep S(z) ≥ τ and answer with counts only.
- the paper's baselines (``selection`` perplexity, ifd, datainf, random) skip the trace:
  sites and anchors are scored at the initial adapter, then the same τ or ``keep_ratio``.
- *tune*: ``num_rounds`` rounds (merge mode: one round of local epochs, then a one-shot
  merge) from the initial adapter on the selected records, aggregated by ``aggregation``.

Replies with errors, non-finite or misshapen adapters are dropped with a log line and named
in ``report["failures"]``; a round aggregates while at least ``min_train_nodes`` valid
replies remain. A client that kept nothing replies 0 examples and takes no weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from clues_flwr.aggregation import aggregate, check_state, fedavg
from clues_flwr.config import BASELINES, SelectionConfig, TuneConfig, from_mapping, to_record
from clues_flwr.messages import (
    CLEAN_EXAMPLES_KEY,
    CLEAN_LOSS_KEY,
    DIRECTION_KEY,
    MOMENTS_KEY,
    SCORE_CONFIG_KEY,
    SCORE_MESSAGE,
    SELECTION_FLAG,
    TRACE_MESSAGE,
    moments_from,
    trajectory_from,
    trajectory_records,
)
from clues_flwr.metrics import selection_scores
from clues_flwr.resume import RunState
from clues_flwr.scoring import ScoreConfig, histogram_edges, threshold
from clues_flwr.train import TrainConfig
from clues_flwr.trajectory import Checkpoint

# What the server needs from the public side: G_t per checkpoint and the anchor scores.
AnchorScorer = Callable[[list[Checkpoint]], tuple[list[torch.Tensor], torch.Tensor]]
# A baseline's anchor scores at an adapter, and the DataInf direction (None for others).
BaselineScorer = Callable[[str, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]]


def say(text: str) -> None:
    print(f"[clues] {text}", flush=True)


class CluesStrategy(FedAvg):
    def __init__(
        self,
        *,
        score_anchors: AnchorScorer,
        score_config: ScoreConfig = ScoreConfig(),
        selection: SelectionConfig = SelectionConfig(),
        tune: TuneConfig = TuneConfig(),
        train: TrainConfig = TrainConfig(),
        score_baseline: BaselineScorer | None = None,
        **fedavg_kwargs: Any,
    ):
        super().__init__(**fedavg_kwargs)
        if selection.method in BASELINES and score_baseline is None:
            raise ValueError(f"selection {selection.method!r} needs score_baseline, the server's scorer of the anchors")
        self.score_anchors, self.score_baseline = score_anchors, score_baseline
        self.score_config, self.selection, self.tune, self.train = score_config, selection, tune, train
        self.phase = "tune"
        self.trajectory: list[Checkpoint] = []
        self.scored_nodes: set[int] | None = None
        self.report: dict[str, Any] = {"failures": [], "trace": {}, "selection": {}}
        self._global: dict[str, torch.Tensor] = {}
        self._destinations: dict[str, int] = {}

    # ---- the three phases -------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        run_dir: str | Path | None = None,
    ) -> Result:
        """Trace, score and tune. With ``run_dir``, the state is saved there after the
        score phase and every tuning round, and a run folder that holds a state continues
        from it: the saved trajectory and τ are sent again (a selection lives on the nodes
        for one run only), and tuning goes on after the last saved round."""
        base = {**to_record(self.train), **dict(train_config or ConfigRecord())}
        self._trace_train = from_mapping(TrainConfig, base)  # a caller's train_config is checked too
        base.update({"score-layer": self.score_config.layer, "score-modules": list(self.score_config.modules)})
        store = RunState(run_dir) if run_dir is not None else None
        saved = store.load() if store else None
        if saved:
            self.report = saved["report"]
            say(f"resume: {run_dir} stands after tuning round {saved['round']}")
        kept = saved.get("public") if saved else None  # the federated trajectory's τ and anchors
        if self.tune.mode == "merge":
            num_rounds = 1
        first = saved["round"] + 1 if saved and saved.get("adapter") else 1
        if self.selection.method == "clues" and first <= num_rounds:
            if kept:
                trajectory, val_sums = store.trajectory()
                public = {None: (trajectory, val_sums, kept)}
                say("resume: scoring again on the saved trajectory and threshold")
            else:
                if self.tune.mode == "federated":
                    trajectories = {None: self._trace_federated(grid, initial_arrays, base, timeout)}
                else:
                    trajectories = self._trace_local(grid, initial_arrays, base, timeout)
                public = self._public(trajectories)
                if store and self.tune.mode == "federated":
                    trajectory, val_sums, kept = public[None]
                    store.save_trajectory(trajectory, val_sums)
                    store.save({"round": 0, "public": kept, "history": {}, "report": self.report})
            self._score(grid, {k: (self._clues_content(*v), v[2]) for k, v in public.items()}, timeout)
        elif self.selection.method in BASELINES and first <= num_rounds:
            self._score(grid, self._baseline_public(initial_arrays, base), timeout)
        self.phase = "tune"
        tune = ConfigRecord({**base, SELECTION_FLAG: self.selection.method, "mode": self.tune.mode})
        history, arrays = Result(), initial_arrays
        if first > 1:
            history = _history_from(saved["history"])
            arrays = history.arrays = ArrayRecord(saved["adapter"])
        elif evaluate_fn:
            _record(history.evaluate_metrics_serverapp, 0, evaluate_fn(0, initial_arrays))
        say(f"tune: rounds {first}..{num_rounds} on {self.selection.method} data, aggregation {self.tune.aggregation}")

        def save(server_round: int, arrays: ArrayRecord, history: Result) -> None:
            state = {"round": server_round, "public": kept, "history": _history_json(history), "report": self.report}
            store.save(state, arrays.to_torch_state_dict())

        rounds = range(first, num_rounds + 1)
        return self._rounds(
            grid, arrays, rounds, tune, timeout, history, evaluate_config, evaluate_fn, save if store else None
        )

    def _rounds(
        self, grid, arrays, rounds, config, timeout, history: Result, evaluate_config=None, evaluate_fn=None, after=None
    ) -> Result:
        """FedAvg's loop: train, aggregate, evaluate on clients and on the server; then
        ``after(round, arrays, history)``. The trace rounds evaluate nothing."""
        for server_round in rounds:
            replies = self._send(grid, self.configure_train(server_round, arrays, config, grid), timeout)
            merged, metrics = self.aggregate_train(server_round, replies)
            if merged is not None:
                arrays = history.arrays = merged
            _record(history.train_metrics_clientapp, server_round, metrics)
            if self.phase == "tune":
                messages = list(self.configure_evaluate(server_round, arrays, evaluate_config or ConfigRecord(), grid))
                if messages:
                    replies = self._send(grid, messages, timeout)
                    _record(
                        history.evaluate_metrics_clientapp, server_round, self.aggregate_evaluate(server_round, replies)
                    )
                if evaluate_fn:
                    _record(history.evaluate_metrics_serverapp, server_round, evaluate_fn(server_round, arrays))
            if after:
                after(server_round, arrays, history)
        return history

    def _trace_federated(self, grid, initial_arrays, base, timeout) -> list[Checkpoint]:
        say(f"trace: {self.selection.trace_rounds} federated round(s) on all data")
        self.phase, self.trajectory = "trace", []
        result = self._rounds(
            grid,
            initial_arrays,
            range(1, self.selection.trace_rounds + 1),
            ConfigRecord({**base, "phase": "trace"}),
            timeout,
            Result(),
        )
        self.report["trace"] = {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
        if not self.trajectory:
            raise RuntimeError("trace: no round aggregated, so there is no trajectory to score on")
        return self.trajectory

    def _trace_local(self, grid, initial_arrays, base, timeout) -> dict[int, list[Checkpoint]]:
        say(f"trace: every client traces {self.selection.trace_rounds} checkpoint(s) alone (merge mode)")
        self.phase = "trace-local"
        self._global = initial_arrays.to_torch_state_dict()
        config = ConfigRecord(
            {**base, "phase": "trace-local", "trace-rounds": self.selection.trace_rounds, "server-round": 0}
        )
        nodes = self._nodes(grid)
        content = RecordDict({self.arrayrecord_key: initial_arrays, self.configrecord_key: config})
        replies = self._send(grid, self._construct_messages(content, nodes, TRACE_MESSAGE), timeout)
        trajectories = {}
        for node, reply in self._screen(replies, "trace"):
            trajectory, _ = trajectory_from(reply)
            trajectories[node] = trajectory
        self._enough(len(trajectories), "trace")
        return trajectories

    def _public(self, trajectories: dict[int | None, list[Checkpoint]]) -> dict[int | None, tuple]:
        """Per trajectory: (trajectory, G_t, what the clients and the report learn: τ, the
        histogram edges, the anchor scores)."""
        public = {}
        for key, trajectory in trajectories.items():
            val_sums, anchor_scores = self.score_anchors(trajectory)
            public[key] = (trajectory, val_sums, self._info(anchor_scores))
        return public

    def _info(self, anchor_scores: torch.Tensor) -> dict:
        """What clients and the report learn of the anchors: τ, the histogram edges, the scores."""
        return {
            "threshold": threshold(anchor_scores, self.selection.threshold_rule, self.selection.target_recall),
            "histogram-edges": histogram_edges(anchor_scores, self.selection.histogram_bins),
            "anchor-scores": anchor_scores.tolist(),
        }

    def _selection_config(self, info: dict, **extra) -> ConfigRecord:
        keys = ("threshold", "histogram-edges")
        return ConfigRecord(
            {
                **{k: info[k] for k in keys},
                "keep-ratio": self.selection.keep_ratio,
                "method": self.selection.method,
                **extra,
            }
        )

    def _clues_content(self, trajectory: list[Checkpoint], val_sums: list[torch.Tensor], info: dict) -> RecordDict:
        content = RecordDict(trajectory_records(trajectory, val_sums))
        content[SCORE_CONFIG_KEY] = ConfigRecord(to_record(self.score_config))
        content["config"] = self._selection_config(info)
        return content

    def _baseline_public(self, initial_arrays: ArrayRecord, base: dict) -> dict[None, tuple[RecordDict, dict]]:
        """A baseline scores at the adapter every site starts from, as the paper applies the
        baselines on each client before any training; no trajectory is needed. DataInf's
        direction comes from the public validation set, so sites and anchors share it."""
        say(f"score: {self.selection.method} at the initial adapter (no trace)")
        anchor_scores, direction = self.score_baseline(self.selection.method, initial_arrays.to_torch_state_dict())
        info = self._info(anchor_scores)
        extra = {
            "batch-size": self.score_config.batch_size,
            "max-seq-len": self.score_config.max_len,
            "seed": base["seed"],
        }
        content = RecordDict({self.arrayrecord_key: initial_arrays, "config": self._selection_config(info, **extra)})
        if direction is not None:
            content[DIRECTION_KEY] = ArrayRecord({"u": direction.float().contiguous()})
        return {None: (content, info)}

    def _score(self, grid: Grid, public: dict[int | None, tuple[RecordDict, dict]], timeout: float) -> None:
        """Send each client what it scores with and τ (or the keep ratio); collect counts."""
        self.phase = "score"
        shared = None in public
        nodes = self._nodes(grid) if shared else list(public)
        messages = [
            Message(content=public[None if shared else n][0], dst_node_id=n, message_type=SCORE_MESSAGE) for n in nodes
        ]
        taus = sorted({round(info["threshold"], 6) for _, info in public.values()})
        rule = (
            f"each client keeps its top {self.selection.keep_ratio:.0%}"
            if self.selection.keep_ratio
            else f"threshold τ = {', '.join(f'{t:.4g}' for t in taus)} ({self.selection.threshold_rule})"
        )
        say(f"score: {rule}; scoring {len(nodes)} client(s)")
        replies = self._send(grid, messages, timeout)
        clients = {}
        for node, reply in self._screen(replies, "score", adapter=False):
            m = reply["metrics"]
            row = {"kept": int(m["kept"]), "total": int(m["total"]), "histogram": list(m["histogram"])}
            if "tp" in m:
                row.update({k: int(m[k]) for k in ("tp", "fp", "fn", "tn")})
            row.update(public[None if shared else node][1])
            clients[node] = row
            say(f"  client {node}: kept {row['kept']}/{row['total']}")
        self._enough(len(clients), "score")
        self.scored_nodes = set(clients)
        summary = {
            "method": self.selection.method,
            "threshold-rule": self.selection.threshold_rule,
            "target-recall": self.selection.target_recall,
            "keep-ratio": self.selection.keep_ratio,
            "clients": {str(n): r for n, r in clients.items()},
        }
        if clients and all("tp" in r for r in clients.values()):
            counts = {k: sum(r[k] for r in clients.values()) for k in ("tp", "fp", "fn", "tn")}
            summary.update(counts=counts, **selection_scores(counts))
            say(
                "selection (positive = clean): precision {precision:.1f}, recall {recall:.1f}, "
                "F1 {f1:.1f}, accuracy {accuracy:.1f}".format(**summary)
            )
        self.report["selection"] = summary

    # ---- FedAvg hooks -----------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.phase == "trace":
            messages = [
                Message(m.content, dst_node_id=m.metadata.dst_node_id, message_type=TRACE_MESSAGE) for m in messages
            ]
        if self.phase == "tune" and self.scored_nodes is not None:
            dropped = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.scored_nodes]
            if dropped:
                say(f"tune round {server_round}: nodes {dropped} have no selection (not scored) and are left out")
            messages = [m for m in messages if m.metadata.dst_node_id in self.scored_nodes]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [
            (node, c)
            for node, c in self._screen(replies, f"{self.phase} round {server_round}")
            if int(c["metrics"][self.weighted_by_key]) > 0
        ]
        if len(valid) < self.min_train_nodes:
            self._failure(
                f"{self.phase} round {server_round}",
                None,
                f"only {len(valid)} usable replies, {self.min_train_nodes} needed: round not aggregated",
            )
            return None, None
        states = [c[self.arrayrecord_key].to_torch_state_dict() for _, c in valid]
        weights = [float(c["metrics"][self.weighted_by_key]) for _, c in valid]
        method = self.tune.aggregation if self.phase == "tune" else "fedavg"
        merged = aggregate(method, states, weights, base=self._global, density=self.tune.ties_density)
        if self.phase == "trace":
            self._add_checkpoint(server_round, merged, [c for _, c in valid], weights)
        return ArrayRecord(merged), MetricRecord(_mean_metrics([c["metrics"] for _, c in valid], weights))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's mean by held-out examples, except the clean held-out loss, which is a
        mean over each site's clean held-out records and so is weighted by their count."""
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is None or CLEAN_LOSS_KEY not in metrics:
            return metrics
        rows = [r.content["metrics"] for r in replies if not r.has_error()]
        count = sum(int(m[CLEAN_EXAMPLES_KEY]) for m in rows)
        metrics[CLEAN_EXAMPLES_KEY] = count
        if count:
            metrics[CLEAN_LOSS_KEY] = sum(float(m[CLEAN_LOSS_KEY]) * int(m[CLEAN_EXAMPLES_KEY]) for m in rows) / count
        else:
            del metrics[CLEAN_LOSS_KEY]
        return metrics

    # ---- helpers ----------------------------------------------------------------------

    def _add_checkpoint(self, server_round: int, adapter, contents: list[RecordDict], weights: list[float]) -> None:
        ms, vs = zip(*(moments_from(c[MOMENTS_KEY]) for c in contents))
        steps = {int(c["metrics"]["adam-step"]) for c in contents}
        self.trajectory.append(
            Checkpoint(
                adapter=adapter,
                exp_avg=fedavg(ms, weights),
                exp_avg_sq=fedavg(vs, weights),
                step=max(steps),
                lr=self._trace_train.learning_rate,
                weight_decay=self._trace_train.weight_decay,
                round=server_round,
            )
        )

    def _nodes(self, grid: Grid) -> list[int]:
        nodes, _ = sample_nodes(grid, self.min_available_nodes, len(list(grid.get_node_ids())))
        return list(nodes)

    def _send(self, grid: Grid, messages: Iterable[Message], timeout: float) -> Iterable[Message]:
        """``grid.send_and_receive``, remembering where each message went: a reply the
        SuperLink writes itself (destination node unavailable, message expired) comes from
        SUPERLINK_NODE_ID and names its node only by the message it replies to, whose ID
        the Grid sets as it pushes it."""
        messages = list(messages)
        replies = grid.send_and_receive(messages, timeout=timeout)
        self._destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        return replies

    def _screen(self, replies: Iterable[Message], where: str, adapter: bool = True) -> list[tuple[int, RecordDict]]:
        """Replies fit to use: no error, the expected records, a finite adapter of the
        global adapter's keys and shapes. Every rejection, and every node sent a message
        that did not answer in time, is logged and reported."""
        ok, answered = [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node == SUPERLINK_NODE_ID:
                node = self._destinations.get(msg.metadata.reply_to_message_id, node)
            answered.add(msg.metadata.reply_to_message_id)
            if msg.has_error():
                self._failure(where, node, f"error reply: {msg.error.reason}")
                continue
            content = msg.content
            if "metrics" not in content:
                self._failure(where, node, "reply without metrics")
                continue
            if adapter:
                if self.arrayrecord_key not in content:
                    self._failure(where, node, "reply without an adapter")
                    continue
                problem = check_state(content[self.arrayrecord_key].to_torch_state_dict(), self._global)
                if problem:
                    self._failure(where, node, f"adapter rejected: {problem}")
                    continue
                if self.weighted_by_key not in content["metrics"]:
                    self._failure(where, node, f"reply without {self.weighted_by_key}")
                    continue
            ok.append((node, content))
        for message_id, node in self._destinations.items():
            if message_id not in answered:
                self._failure(where, node, "no reply before the round's timeout")
        return ok

    def _failure(self, where: str, node: int | None, reason: str) -> None:
        who = f"node {node}" if node is not None else "server"
        say(f"{where}: {who}: {reason}")
        self.report["failures"].append({"where": where, "node": node, "reason": reason})

    def _enough(self, count: int, phase: str) -> None:
        if count < self.min_train_nodes:
            raise RuntimeError(f"{phase}: {count} client(s) replied, min-train-nodes is {self.min_train_nodes}")


def _record(history: dict[int, MetricRecord], server_round: int, metrics: MetricRecord | None) -> None:
    if metrics is not None:
        history[server_round] = metrics


def _history_json(history: Result) -> dict:
    return {
        name: {str(r): dict(m) for r, m in getattr(history, name).items()}
        for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")
    }


def _history_from(saved: dict) -> Result:
    history = Result()
    for name, rounds in saved.items():
        getattr(history, name).update({int(r): MetricRecord(m) for r, m in rounds.items()})
    return history


def _mean_metrics(records: list[MetricRecord], weights: list[float]) -> dict[str, float]:
    """Weighted mean of the scalar metrics every reply has; counts are summed."""
    keys = set.intersection(*(set(r.keys()) for r in records))
    total = sum(weights)
    out = {}
    for key in sorted(keys):
        values = [r[key] for r in records]
        if any(isinstance(v, list) for v in values):
            continue
        out[key] = sum(values) if key == "num-examples" else sum(w * float(v) for w, v in zip(weights, values)) / total
    return out

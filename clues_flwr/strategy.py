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
- *tune*: ``num_rounds`` rounds (merge mode: one round of local epochs, then a one-shot
  merge) from the initial adapter on the selected records, aggregated by ``aggregation``.

Replies with errors, non-finite or misshapen adapters are dropped with a log line and named
in ``report["failures"]``; a round aggregates while at least ``min_train_nodes`` valid
replies remain. A client that kept nothing replies 0 examples and takes no weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from clues_flwr.aggregation import METHODS, aggregate, check_state, fedavg
from clues_flwr.messages import MOMENTS_KEY, SCORE_CONFIG_KEY, moments_from, score_config_record, trajectory_from, trajectory_records
from clues_flwr.metrics import selection_scores
from clues_flwr.scoring import THRESHOLD_RULES, ScoreConfig, histogram_edges, threshold
from clues_flwr.trajectory import Checkpoint

MODES = ("federated", "merge")
SELECTIONS = ("clues", "none", "oracle")
TRAIN_KEYS = ("lr", "local-steps", "batch-size", "max-seq-len", "seed")
# What the server needs from the public side: G_t per checkpoint and the anchor scores.
AnchorScorer = Callable[[list[Checkpoint]], tuple[list[torch.Tensor], torch.Tensor]]


def say(text: str) -> None:
    print(f"[clues] {text}", flush=True)


class CluesStrategy(FedAvg):
    def __init__(
        self,
        *,
        score_anchors: AnchorScorer,
        score_config: ScoreConfig = ScoreConfig(),
        mode: str = "federated",
        selection: str = "clues",
        trace_rounds: int = 2,
        threshold_rule: str = "anchor-quantile",
        target_recall: float = 0.9,
        aggregation: str = "fedavg",
        ties_density: float = 0.5,
        local_epochs: int = 1,
        histogram_bins: int = 10,
        **fedavg_kwargs: Any,
    ):
        super().__init__(**fedavg_kwargs)
        for name, value, allowed in (
            ("mode", mode, MODES),
            ("selection", selection, SELECTIONS),
            ("aggregation", aggregation, METHODS),
            ("threshold-rule", threshold_rule, THRESHOLD_RULES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if trace_rounds < 1 and selection == "clues":
            raise ValueError("trace-rounds must be at least 1: CLUES scores along a trajectory")
        if not 0 < target_recall < 1:
            raise ValueError(f"target-recall must be in (0, 1), got {target_recall}")
        if not 0 < ties_density <= 1:
            raise ValueError(f"ties-density must be in (0, 1], got {ties_density}")
        self.score_anchors = score_anchors
        self.score_config = score_config
        self.mode, self.selection = mode, selection
        self.trace_rounds, self.local_epochs = trace_rounds, local_epochs
        self.threshold_rule, self.target_recall = threshold_rule, target_recall
        self.aggregation, self.ties_density = aggregation, ties_density
        self.histogram_bins = histogram_bins
        self.phase = "tune"
        self.trajectory: list[Checkpoint] = []
        self.scored_nodes: set[int] | None = None
        self.report: dict[str, Any] = {"failures": [], "trace": {}, "selection": {}}
        self._global: dict[str, torch.Tensor] = {}
        self._trace_lr = 0.0

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
    ) -> Result:
        base = dict(train_config or ConfigRecord())
        missing = [k for k in TRAIN_KEYS if k not in base]
        if missing:
            raise ValueError(f"train_config lacks {', '.join(missing)}: clients train with what the server sends")
        base.update({"score-layer": self.score_config.layer, "score-modules": list(self.score_config.modules)})
        if self.selection == "clues":
            self._trace_lr = float(base["lr"])
            if self.mode == "federated":
                trajectories = {None: self._trace_federated(grid, initial_arrays, base, timeout)}
            else:
                trajectories = self._trace_local(grid, initial_arrays, base, timeout)
            self._score(grid, trajectories, timeout)
        self.phase = "tune"
        tune = ConfigRecord({**base, "phase": "tune", "selection": self.selection})
        if self.mode == "merge":
            tune["local-epochs"] = self.local_epochs
            num_rounds = 1
        say(f"tune: {num_rounds} round(s) on {self.selection} data, aggregation {self.aggregation}")
        return super().start(grid, initial_arrays, num_rounds, timeout, tune, evaluate_config, evaluate_fn)

    def _trace_federated(self, grid, initial_arrays, base, timeout) -> list[Checkpoint]:
        say(f"trace: {self.trace_rounds} federated round(s) on all data")
        self.phase, self.trajectory = "trace", []
        result = super().start(grid, initial_arrays, self.trace_rounds, timeout, ConfigRecord({**base, "phase": "trace"}))
        self.report["trace"] = {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
        if not self.trajectory:
            raise RuntimeError("trace: no round aggregated, so there is no trajectory to score on")
        return self.trajectory

    def _trace_local(self, grid, initial_arrays, base, timeout) -> dict[int, list[Checkpoint]]:
        say(f"trace: every client traces {self.trace_rounds} checkpoint(s) alone (merge mode)")
        self.phase = "trace-local"
        self._global = initial_arrays.to_torch_state_dict()
        config = ConfigRecord({**base, "phase": "trace-local", "trace-rounds": self.trace_rounds, "server-round": 0})
        nodes = self._nodes(grid)
        content = RecordDict({self.arrayrecord_key: initial_arrays, self.configrecord_key: config})
        replies = grid.send_and_receive(self._construct_messages(content, nodes, "train"), timeout=timeout)
        trajectories = {}
        for node, reply in self._screen(replies, "trace"):
            trajectory, _ = trajectory_from(reply)
            trajectories[node] = trajectory
        self._enough(len(trajectories), "trace")
        return trajectories

    def _score(self, grid: Grid, trajectories: dict[int | None, list[Checkpoint]], timeout: float) -> None:
        """Server-side anchor scores and τ per trajectory, then the clients' counts."""
        self.phase = "score"
        public = {}  # per trajectory: the message every client on it gets, and what the report keeps
        for key, trajectory in trajectories.items():
            val_sums, anchor_scores = self.score_anchors(trajectory)
            info = {
                "threshold": threshold(anchor_scores, self.threshold_rule, self.target_recall),
                "histogram-edges": histogram_edges(anchor_scores, self.histogram_bins),
            }
            content = RecordDict(trajectory_records(trajectory, val_sums))
            content[SCORE_CONFIG_KEY] = score_config_record(self.score_config)
            content["config"] = ConfigRecord(dict(info))
            public[key] = (content, {**info, "anchor-scores": anchor_scores.tolist()})
        shared = None in public
        nodes = self._nodes(grid) if shared else list(public)
        messages = [Message(content=public[None if shared else n][0], dst_node_id=n, message_type="query.score") for n in nodes]
        taus = sorted({round(info["threshold"], 6) for _, info in public.values()})
        say(f"score: threshold τ = {', '.join(f'{t:.4g}' for t in taus)} ({self.threshold_rule}); scoring {len(nodes)} client(s)")
        replies = grid.send_and_receive(messages, timeout=timeout)
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
        summary = {"threshold-rule": self.threshold_rule, "target-recall": self.target_recall, "clients": {str(n): r for n, r in clients.items()}}
        if clients and all("tp" in r for r in clients.values()):
            counts = {k: sum(r[k] for r in clients.values()) for k in ("tp", "fp", "fn", "tn")}
            summary.update(counts=counts, **selection_scores(counts))
            say("selection (positive = clean): precision {precision:.1f}, recall {recall:.1f}, F1 {f1:.1f}, accuracy {accuracy:.1f}".format(**summary))
        self.report["selection"] = summary

    # ---- FedAvg hooks -----------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.phase == "tune" and self.scored_nodes is not None:
            dropped = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.scored_nodes]
            if dropped:
                say(f"tune round {server_round}: nodes {dropped} have no selection (not scored) and are left out")
            messages = [m for m in messages if m.metadata.dst_node_id in self.scored_nodes]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.phase == "trace":
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = [
            (node, c) for node, c in self._screen(replies, f"{self.phase} round {server_round}")
            if int(c["metrics"][self.weighted_by_key]) > 0
        ]
        if len(valid) < self.min_train_nodes:
            self._failure(f"{self.phase} round {server_round}", None, f"only {len(valid)} usable replies, {self.min_train_nodes} needed: round not aggregated")
            return None, None
        states = [c[self.arrayrecord_key].to_torch_state_dict() for _, c in valid]
        weights = [float(c["metrics"][self.weighted_by_key]) for _, c in valid]
        method = self.aggregation if self.phase == "tune" else "fedavg"
        merged = aggregate(method, states, weights, base=self._global, density=self.ties_density)
        if self.phase == "trace":
            self._add_checkpoint(server_round, merged, [c for _, c in valid], weights)
        return ArrayRecord(merged), MetricRecord(_mean_metrics([c["metrics"] for _, c in valid], weights))

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
                lr=float(self._trace_lr),
                round=server_round,
            )
        )

    def _nodes(self, grid: Grid) -> list[int]:
        nodes, _ = sample_nodes(grid, self.min_available_nodes, len(list(grid.get_node_ids())))
        return list(nodes)

    def _screen(self, replies: Iterable[Message], where: str, adapter: bool = True) -> list[tuple[int, RecordDict]]:
        """Replies fit to use: no error, the expected records, a finite adapter of the
        global adapter's keys and shapes. Every rejection is logged and reported."""
        ok = []
        for msg in replies:
            node = msg.metadata.src_node_id
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
        return ok

    def _failure(self, where: str, node: int | None, reason: str) -> None:
        who = f"node {node}" if node is not None else "server"
        say(f"{where}: {who}: {reason}")
        self.report["failures"].append({"where": where, "node": node, "reason": reason})

    def _enough(self, count: int, phase: str) -> None:
        if count < self.min_train_nodes:
            raise RuntimeError(f"{phase}: {count} client(s) replied, min-train-nodes is {self.min_train_nodes}")


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

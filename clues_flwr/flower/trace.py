"""The federated trace: FedAvg rounds on every record whose aggregates, with the sites'
scoring-layer AdamW moments averaged by the same weights, are the trajectory's checkpoints."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from clues_flwr.core.aggregation import fedavg
from clues_flwr.core.train import TrainConfig
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.flower.exchange import Failures, usable
from clues_flwr.flower.log import say
from clues_flwr.flower.protocol import TRACE_MESSAGE, TraceReply


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
        """Every reply decoded (one that does not is its site's failure); the adapters and the
        moments averaged by the same weights in float64 (FedAvg's own aggregation sums in
        float32, which moves τ on the demo by 4e-5); the metrics by FedAvg's own function."""
        where = f"trace round {server_round}"
        ok = usable(replies, self._sent, where, self.failures, lambda node, c: TraceReply.decode(c, self._global))
        if len(ok) < self.min_train_nodes:
            self.failures.add(where, None, f"only {len(ok)} usable replies, {self.min_train_nodes} needed")
            return None, None
        traced = [reply for _, _, reply in ok]
        self.failures.learn({node: reply.label for node, _, reply in ok})
        weights = [float(r.num_examples) for r in traced]
        adapter = fedavg([r.adapter for r in traced], weights)
        ms, vs = zip(*(r.moments for r in traced))
        self.trajectory.append(
            Checkpoint(
                adapter=adapter,
                exp_avg=fedavg(ms, weights),
                exp_avg_sq=fedavg(vs, weights),
                step=max(r.adam_step for r in traced),
                lr=self.train.learning_rate,
                weight_decay=self.train.weight_decay,
                round=server_round,
            )
        )
        return ArrayRecord(adapter), self.train_metrics_aggr_fn([m.content for _, m, _ in ok], self.weighted_by_key)

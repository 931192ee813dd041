"""The federated trace: FedAvg rounds on every record whose aggregates, with the sites'
scoring-layer AdamW moments averaged by the same weights, are the trajectory's checkpoints."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from clues_flwr.core.train import TrainConfig
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.flower.exchange import Failures, usable
from clues_flwr.flower.log import say
from clues_flwr.flower.protocol import TRACE_MESSAGE, TraceReply, moment_tensors, moments_of


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
        """Every reply decoded (one that does not is its site's failure), then FedAvg's own
        aggregation of what was decoded: each reply's adapter and scoring-layer moments in one
        float64 ArrayRecord of a message of its own (the reply stays as it came), so that the
        moments are averaged by the adapters' weights and the sums are taken in float64 (in
        float32 they move τ on the demo by 4e-5). The aggregate is the round's checkpoint."""
        where = f"trace round {server_round}"
        ok = usable(replies, self._sent, where, self.failures, lambda node, c: TraceReply.decode(c, self._global))
        if len(ok) < self.min_train_nodes:
            self.failures.add(where, None, f"only {len(ok)} usable replies, {self.min_train_nodes} needed")
            return None, None
        self.failures.learn({node: reply.label for node, _, reply in ok})
        decoded = []
        for node, msg, reply in ok:
            m, v = reply.moments
            tensors = {k: t.double() for k, t in {**reply.adapter, **moment_tensors(m, v)}.items()}
            content = RecordDict({"arrays": ArrayRecord(tensors), "metrics": msg.content["metrics"]})
            decoded.append(Message(content, dst_node_id=node, message_type=TRACE_MESSAGE))
        arrays, metrics = super().aggregate_train(server_round, decoded)
        mean = {k: t.float() for k, t in arrays.to_torch_state_dict().items()}
        adapter = {k: mean[k] for k in self._global}
        exp_avg, exp_avg_sq = moments_of(mean)
        self.trajectory.append(
            Checkpoint(
                adapter=adapter,
                exp_avg=exp_avg,
                exp_avg_sq=exp_avg_sq,
                step=max(reply.adam_step for _, _, reply in ok),
                lr=self.train.learning_rate,
                weight_decay=self.train.weight_decay,
                round=server_round,
            )
        )
        return ArrayRecord(adapter), metrics

"""The local LoRA training loop: AdamW on the answer tokens of a client's records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice

import torch

from clues_flwr.core.checks import at_least, require
from clues_flwr.core.data import Record, batches, to_device


@dataclass(frozen=True)
class TrainConfig:
    """A site's local training, as the server sends it; ``seed`` is the run's, each round
    and phase shuffles with its own seed derived from it."""

    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate, trace and tuning rounds"})
    weight_decay: float = field(  # torch's AdamW default; Γ includes its term (scoring.precondition)
        default=0.01,
        metadata={
            "help": "AdamW's decoupled weight decay λ (torch's default); checkpoints carry it, Γ has its λθ_t term"
        },
    )
    local_steps: int = field(default=10, metadata={"help": "AdamW steps per site per round"})
    batch_size: int = field(default=16, metadata={"help": "records per training step"})
    max_seq_len: int = field(
        default=96,
        metadata={"help": "tokens per record, in training and in scoring (the prompt is cut from the left)"},
    )
    local_epochs: int = field(  # merge mode: epochs over the selected records instead of local-steps
        default=1, metadata={"help": "merge mode: epochs over the selected records, instead of `local-steps`"}
    )
    seed: int = field(
        default=0, metadata={"help": "the run's seed; each round and phase shuffles with one derived from it"}
    )

    def __post_init__(self):
        require("learning-rate", self.learning_rate, self.learning_rate > 0, "positive")
        require("weight-decay", self.weight_decay, self.weight_decay >= 0, "0 or more")
        at_least(self, 1, "local-steps", "batch-size", "local-epochs")
        require("max-seq-len", self.max_seq_len, self.max_seq_len >= 2, "at least 2")


def endless_batches(
    records: Sequence[Record], tokenizer, batch_size: int, max_len: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled epochs one after another, each with its own seed."""
    epoch = 0
    while True:
        yield from batches(records, tokenizer, batch_size, max_len, seed=seed + epoch)
        epoch += 1


def training(
    model, tokenizer, records: Sequence[Record], train: TrainConfig, seed: int
) -> Iterator[tuple[float, torch.optim.AdamW]]:
    """AdamW steps on the trainable (LoRA) parameters, with ``train``'s learning rate, weight
    decay, batch size and max-seq-len, for as long as the caller takes them, yielding (loss,
    optimizer) after each. One data order (from ``seed``, not ``train.seed``: each round and
    phase derives its own) runs through the whole loop, so a caller that snapshots checkpoints
    every k steps still sees every record once per epoch.
    """
    if not records:
        raise ValueError("no training records: the client's data is empty")
    torch.manual_seed(seed)  # LoRA dropout: the same round trains the same in any runtime
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    model.train()
    for batch in endless_batches(records, tokenizer, train.batch_size, train.max_seq_len, seed):
        loss = model(**to_device(batch, model)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield loss.item(), opt


def train_steps(loop: Iterator[tuple[float, torch.optim.AdamW]], steps: int) -> tuple[list[float], torch.optim.AdamW]:
    """``steps`` steps of a ``training`` loop: the losses and the optimizer, whose moments
    make the trajectory checkpoint. A federated round starts a fresh loop and optimizer,
    since the previous round's moments belong to another global model."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    losses, opt = [], None
    for loss, opt in islice(loop, steps):
        losses.append(loss)
    return losses, opt

"""The local LoRA training loop: AdamW on the answer tokens of a client's records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from clues_flwr.data import Record, batches


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    return {k: v.to(model.device) for k, v in batch.items()}


def endless_batches(
    records: Sequence[Record], tokenizer, batch_size: int, max_len: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled epochs one after another, each with its own seed."""
    epoch = 0
    while True:
        yield from batches(records, tokenizer, batch_size, max_len, seed=seed + epoch)
        epoch += 1


def train_steps(
    model,
    tokenizer,
    records: Sequence[Record],
    steps: int,
    batch_size: int,
    lr: float,
    max_len: int,
    seed: int,
    optimizer: torch.optim.AdamW | None = None,
) -> tuple[list[float], torch.optim.AdamW]:
    """Run ``steps`` AdamW steps on the trainable (LoRA) parameters.

    Returns the losses and the optimizer, whose moments make the trajectory checkpoint.
    Pass the optimizer back to continue a local trajectory; a federated round starts a
    fresh one, since the previous round's moments belong to another global model.
    """
    if not records:
        raise ValueError("no training records: the client's data is empty")
    torch.manual_seed(seed)  # LoRA dropout: the same round trains the same in any runtime
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(params, lr=lr)
    data = endless_batches(records, tokenizer, batch_size, max_len, seed)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**to_device(next(data), model)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, opt

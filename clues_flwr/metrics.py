"""Evaluation of a model on instruction records: answer loss and exact-match accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clues_flwr.data import Record, batches, prompt
from clues_flwr.train import to_device


@torch.no_grad()
def eval_loss(model, tokenizer, records: Sequence[Record], batch_size: int, max_len: int) -> float:
    """Mean cross-entropy over all answer tokens of ``records`` (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches(records, tokenizer, batch_size, max_len):
        batch = to_device(batch, model)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        ).item()
        count += int((labels != -100).sum())
    return total / max(count, 1)


def normalise(answer: str) -> str:
    return " ".join(answer.split()).casefold()


@torch.no_grad()
def answer_accuracy(
    model, tokenizer, records: Sequence[Record], batch_size: int, max_new_tokens: int
) -> float:
    """Share of records whose greedy answer equals the reference (case and spacing aside)."""
    model.eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    hits = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [bos + tokenizer(prompt(r), add_special_tokens=False)["input_ids"] for r in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for record, generated in zip(chunk, out[:, width:].tolist()):
            if tokenizer.eos_token_id in generated:
                generated = generated[: generated.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(generated, skip_special_tokens=True)
            hits += normalise(text) == normalise(record["output"])
    return hits / max(len(records), 1)

"""Evaluation of a model on instruction records: answer loss and exact-match accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from clues_flwr.core.data import Record, batches, prompt, to_device


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
def answer_accuracy(model, tokenizer, records: Sequence[Record], batch_size: int, max_new_tokens: int) -> float:
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


def confusion(kept: Sequence[bool], clean: Sequence[bool]) -> dict[str, int]:
    """Selection counts with positive = clean: what a client may share about its labels."""
    pairs = list(zip(kept, clean, strict=True))
    return {
        "tp": sum(k and c for k, c in pairs),
        "fp": sum(k and not c for k, c in pairs),
        "fn": sum(c and not k for k, c in pairs),
        "tn": sum(not k and not c for k, c in pairs),
    }


def selection_scores(counts: dict[str, int]) -> dict[str, float]:
    """Precision, recall, F1 and accuracy (in %) from confusion counts, which add up
    across clients, so the server can report the federation without per-sample data."""
    tp, fp, fn, tn = (counts[k] for k in ("tp", "fp", "fn", "tn"))
    precision = 100 * tp / (tp + fp) if tp + fp else 0.0
    recall = 100 * tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = 100 * (tp + tn) / max(tp + fp + fn + tn, 1)
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return float("nan")
    ranked = sorted((s, i) for i, s in enumerate(list(pos) + list(neg)))
    ranks = [0.0] * len(ranked)
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[ranked[k][1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(ranks[: len(pos)])
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def best_f1(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """The highest F1 (in %) of ``score ≥ τ`` over every τ: what a perfect threshold rule
    would reach with this ranking, so a rule's F1 can be told apart from the ranking's."""
    pairs = sorted(zip(scores, positive, strict=True), key=lambda sp: -sp[0])
    total = sum(positive)
    best, tp = 0.0, 0
    for i, (s, p) in enumerate(pairs):
        tp += p
        if i + 1 < len(pairs) and pairs[i + 1][0] == s:
            continue  # a threshold keeps all tied scores or none
        best = max(best, 200 * tp / (i + 1 + total))
    return best

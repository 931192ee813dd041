"""Instruction records: the prompt template, tokenisation, batches, run-config lists.

A record is ``{"instruction", "input", "output"}``, plus ``quality`` and ``pollution`` on
private records whose truth is known (the demo's records are built in ``clues_flwr.demo.dataset``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence

import torch

Record = dict[str, str]


def parse_names(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` (a run-config value) -> ("q_proj", "v_proj")."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def parse_ratios(text: str) -> list[float]:
    """``"0.8,0.2,0.1,0.5"`` -> floats, with an error naming the setting."""
    try:
        ratios = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise ValueError(f"pollution: expected comma-separated numbers, got {text!r}") from err
    if not ratios or any(not 0 <= r <= 1 for r in ratios):
        raise ValueError(f"pollution: expected ratios in [0, 1], got {text!r}")
    return ratios


def split_heldout(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held-out) by a seeded shuffle; held-out is at least one record."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, int(len(records) * fraction)) if len(records) > 1 else 0
    return [records[i] for i in order[k:]], [records[i] for i in order[:k]]


def prompt_format(records: Sequence[Record]) -> str:
    """``own`` when every record carries its own prompt, ``template`` when none does, else
    ``mixed``: scores of records formatted differently are not comparable."""
    own = sum("prompt" in r for r in records)
    return "own" if records and own == len(records) else "template" if own == 0 else "mixed"


def prompt_kept(records: Sequence[Record], tokenizer, max_len: int) -> float:
    """The median share of each record's prompt tokens that ``encode`` keeps in ``max_len``
    tokens (the answer is kept whole first)."""
    shares = []
    for record in records:
        full = len(tokenizer(prompt(record), add_special_tokens=False)["input_ids"])
        masked = sum(label == -100 for label in encode(record, tokenizer, max_len)[1])  # BOS and prompt
        shares.append((masked - len(_bos(tokenizer))) / full if full else 1.0)
    return float(sorted(shares)[len(shares) // 2]) if shares else 1.0


def check_max_len(records: Sequence[Record], tokenizer, max_len: int) -> None:
    """Refuse a ``max-seq-len`` that cuts most of the public records' prompts away: their
    answers would be learnt and scored without their questions."""
    kept = prompt_kept(records, tokenizer, max_len)
    if kept < 0.5:
        raise ValueError(
            f"max-seq-len {max_len} is too short for a prompt and an answer: the median public record keeps "
            f"{kept:.0%} of its prompt; raise it"
        )


def prompt(record: Record) -> str:
    """The text that precedes the answer: the record's own ``prompt`` when it has one (a
    project with its own template formats it there, so CLUES traces and scores the text
    the project trains on), else the Alpaca-style template."""
    if "prompt" in record:
        return record["prompt"]
    if record.get("input"):
        return f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n### Response:\n"
    return f"### Instruction:\n{record['instruction']}\n\n### Response:\n"


def pretrain_text(record: Record) -> str:
    """Plain text for the backbone's pretraining: the facts without the chat template."""
    return f"{record['instruction']}\n{record['input']}\n{record['output']}"


def _bos(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _answer(record: Record, tokenizer, max_len: int) -> list[int]:
    """The answer and its end-of-sequence token, cut to leave the prompt one token."""
    a = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    return (a + [tokenizer.eos_token_id])[: max_len - len(_bos(tokenizer)) - 1]


def encode(record: Record, tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels with the prompt masked (-100): loss on the answer only.

    The prompt is truncated from the left when the whole does not fit, so the answer
    and its end-of-sequence token are kept.
    """
    bos = _bos(tokenizer)
    p = tokenizer(prompt(record), add_special_tokens=False)["input_ids"]
    a = _answer(record, tokenizer, max_len)
    p = p[max(0, len(p) - (max_len - len(bos) - len(a))) :]
    ids = bos + p + a
    return ids, [-100] * (len(bos) + len(p)) + a


def encode_answer(record: Record, tokenizer, max_len: int) -> tuple[list[int], list[int]]:
    """The answer with no prompt, all of it labelled: the same tokens ``encode`` scores,
    so a loss ratio between the two compares like with like (IFD's s(A|Q) / s(A)).
    Without a BOS token the first answer token has no context and drops out of the loss."""
    bos = _bos(tokenizer)
    a = _answer(record, tokenizer, max_len)
    return bos + a, [-100] * len(bos) + a


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked from attention and from the loss."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def per_record(
    fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    records: Sequence[Record],
    tokenizer,
    batch_size: int,
    max_len: int,
    encoder: Callable[[Record, object, int], tuple[list[int], list[int]]] = encode,
) -> torch.Tensor:
    """``fn(batch)`` [B, ...] for every record, returned in the records' order.

    Batches group records of similar length, since padding is compute spent on nothing;
    padding is masked, so which records share a batch does not change a record's result
    (beyond rounding). No records: an empty tensor.
    """
    encoded = [encoder(r, tokenizer, max_len) for r in records]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    out = None
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        part = fn(collate([encoded[i] for i in index], tokenizer.pad_token_id))
        if out is None:
            out = part.new_empty((len(records), *part.shape[1:]))
        out[torch.tensor(index, device=part.device)] = part
    return torch.zeros(0) if out is None else out


def batches(
    records: Sequence[Record],
    tokenizer,
    batch_size: int,
    max_len: int,
    seed: int | None = None,
    encoder: Callable[[Record, object, int], tuple[list[int], list[int]]] = encode,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches over the records once; shuffled when a seed is given."""
    order = list(range(len(records)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [encoder(records[i], tokenizer, max_len) for i in order[start : start + batch_size]]
        yield collate(chunk, tokenizer.pad_token_id)


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """A batch on the model's device."""
    return {k: v.to(model.device) for k, v in batch.items()}

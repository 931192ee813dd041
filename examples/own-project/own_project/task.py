"""The project's own pieces: model loader, prompt template, data and training loop.

Nothing here knows CLUES. The model is the clues-flwr demo backbone only because it ships
offline; any causal LM with LoRA on ``q_proj``/``v_proj`` would do.
"""

from __future__ import annotations

import random

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from clues_flwr import demo_model_path

TEMPLATE = "Question: {instruction} {input}\nAnswer: "


def load_model():
    """Their loader: a float32 base with their own LoRA settings."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
    return model, tokenizer


def sums(count: int, seed: int, wrong: float = 0.0) -> list[dict]:
    """Addition questions; a share ``wrong`` of the answers is off (their low-quality data)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randrange(100), rng.randrange(100)
        bad = rng.random() < wrong
        answer = a + b + rng.randrange(1, 20) if bad else a + b
        question = {"instruction": "Add.", "input": f"{a} + {b}"}
        # the formatted prompt travels with the record, so CLUES scores the text they train on
        records.append(
            {
                **question,
                "prompt": TEMPLATE.format(**question),
                "output": str(answer),
                "quality": "low" if bad else "high",
            }
        )
    return records


def encode(record: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Their template; the loss is on the answer and the end-of-text token."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    answer = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(prompt + answer)
    labels = torch.tensor([-100] * len(prompt) + answer)
    return ids, labels


def train(model, tokenizer, records: list[dict], steps: int, lr: float, proximal_mu: float, seed: int) -> float:
    """Their loop: SGD one record at a time, with FedProx's proximal term to the global weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=lr)
    rng = random.Random(seed)
    model.train()
    losses = []
    for _ in range(steps):
        ids, labels = encode(rng.choice(records), tokenizer)
        loss = model(input_ids=ids[None], labels=labels[None]).loss
        proximal = sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
        (loss + proximal_mu / 2 * proximal).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return sum(losses) / len(losses)

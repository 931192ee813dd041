"""Build the embedded demo backbone: a byte-level BPE tokenizer and a ~1M-parameter Llama,
pretrained on the demo's facts as plain text.

    python -m clues_flwr.harness.pretrain            # rewrites clues_flwr/assets/demo-model
    python -m clues_flwr.harness.pretrain --out /tmp/unread --unread-facts
    python -m clues_flwr.harness.pretrain --out /tmp/big --hidden-size 256 --layers 6
    python -m clues_flwr.harness.pretrain --out /tmp/unicode/backbone --corpus /tmp/unicode/corpus.jsonl

The last three build backbones for experiments; pass the folder as ``--model-name``. With
``--corpus`` the backbone reads that file's records instead of the demo's facts (e.g. the
corpus ``clues_flwr.harness.unicode_domain`` writes for its own setting).

A random backbone gives LoRA too little to adapt and CLUES too little signal, so the demo
ships a pretrained one. Seeded and deterministic, so a rerun with the same ``--threads`` on
the same torch build reproduces the artifact.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from clues_flwr.core.data import collate, pretrain_text, prompt, to_device
from clues_flwr.demo.dataset import demo_records, demo_splits
from clues_flwr.model import DEMO_DIR
from clues_flwr.sources import load_records

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
HEAD_DIM = 32


def attention_heads(hidden_size: int) -> int:
    """Heads of ``HEAD_DIM`` each, the shape of every backbone built here; the one check of
    a hidden size, so callers can refuse a bad one before any work."""
    if hidden_size <= 0 or hidden_size % HEAD_DIM:
        raise ValueError(
            f"hidden size must be a positive multiple of {HEAD_DIM} (heads of {HEAD_DIM}), got {hidden_size}"
        )
    return hidden_size // HEAD_DIM


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The prompt template is part of the tokenizer's world, not of the model's corpus.
    template = prompt({"instruction": "x", "input": "y", "output": ""})
    tok.train_from_iterator(texts + [template] * 100, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL["pad"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
    )


def pretrain(
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    threads: int,
    template_share: float,
    hidden_size: int = 128,
    layers: int = 4,
    all_facts: bool = True,
    device: str = "cpu",
    corpus: Path | None = None,
) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = attention_heads(hidden_size)
    if corpus is not None and not all_facts:
        raise ValueError("--unread-facts leaves half of the demo's facts unread; it has no meaning with --corpus")
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    # CUDA has no deterministic kernel for every op; there a rerun is close, not equal.
    torch.use_deterministic_algorithms(True, warn_only=device != "cpu")
    # The backbone reads every fact of the demo universe as plain text, as a web-pretrained
    # LLM has read encyclopedias; what fine-tuning adds is answering in the chat template,
    # and what polluted records do is teach wrong answers to questions it could answer.
    # That is the situation CLUES is for. Only the pretraining half is ever seen in the
    # template (a share of it, as a web model has seen some instruction data), so the
    # fine-tuning, validation, anchor and test records stay unseen as instructions.
    # ``all_facts=False`` leaves the other half unread, for the experiment of a base model
    # that does not know the facts it is fine-tuned on. A ``corpus`` replaces the demo's
    # facts: read the same way, plain text with a share in the template.
    rng = random.Random(seed)
    pretraining = demo_splits(0).pretrain if corpus is None else load_records(str(corpus))
    texts = [prompt(r) + r["output"] if rng.random() < template_share else pretrain_text(r) for r in pretraining]
    if corpus is None and all_facts:
        seen = {(r["instruction"], r["input"]) for r in pretraining}
        texts += [pretrain_text(r) for r in demo_records()[0] if (r["instruction"], r["input"]) not in seen]
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).to(device)
    encoded = []
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = (ids + [tokenizer.eos_token_id])[:128]
        encoded.append((ids, ids))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    start, losses = time.time(), []
    model.train()
    for step in range(steps):
        batch = collate(rng.sample(encoded, batch_size), tokenizer.pad_token_id)
        loss = model(**to_device(batch, model)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            print(f"step {step + 1}/{steps}  loss {sum(losses[-200:]) / 200:.3f}  {time.time() - start:.0f}s")
    info = {
        "corpus_texts": len(texts),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "threads": threads,
        "template_share": template_share,
        "hidden_size": hidden_size,
        "layers": layers,
        "all_facts": all_facts,
        "final_loss": round(sum(losses[-100:]) / min(100, len(losses)), 4),
        "seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        "device": device,
    }
    if corpus is not None:  # absent otherwise, so the demo's pretrain.json stays as it was
        info.update(corpus=str(corpus), corpus_records=len(pretraining))
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp) / "model"
        model.cpu().save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        for f in staging.iterdir():
            f.chmod(0o644)
        staging.chmod(0o755)
        staging.rename(out)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--template-share", type=float, default=0.25)
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (the shipped artifact, bit-reproducible) or cuda, for backbones too big for a CPU",
    )
    parser.add_argument("--hidden-size", type=int, default=128, help=f"a multiple of {HEAD_DIM} (heads of {HEAD_DIM})")
    parser.add_argument("--layers", type=int, default=4)
    facts = parser.add_mutually_exclusive_group()
    facts.add_argument("--corpus", type=Path, help="JSONL of records to read instead of the demo's facts")
    facts.add_argument(
        "--unread-facts",
        action="store_true",
        help="read only the pretraining half of the facts: a base that does not know what it is fine-tuned on",
    )
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = pretrain(
        args.out,
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        args.threads,
        args.template_share,
        hidden_size=args.hidden_size,
        layers=args.layers,
        all_facts=not args.unread_facts,
        device=args.device,
        corpus=args.corpus,
    )
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

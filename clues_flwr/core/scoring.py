"""CLUES scores: batched per-sample gradients of the scoring layer, preconditioned like
AdamW's update, aligned with the validation set along a trajectory.

    Γ(z; θ_t)  per-sample update direction of the scoring layer's LoRA A and B at checkpoint t
    G_t        Σ_{z' ∈ val} Γ(z'; θ_t), computed once per checkpoint
    S(z)       Σ_t η_t ⟨G_t, Γ(z; θ_t)⟩

Cost O(T·(|D| + |D_val|)·d): the validation sum is shared by every sample, so there is no
loop over validation × train pairs. Per-sample gradients come from one forward and one
backward per padded batch: hooks keep each LoRA matrix's input and output gradient, and one
einsum per matrix gives every sample's gradient (a Linear layer's weight gradient is the
sum over positions of output-gradient ⊗ input).
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
from collections.abc import Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clues_flwr.core.adapter import adapter_key, set_adapter_state
from clues_flwr.core.checks import one_of, require
from clues_flwr.core.data import Record, per_record, to_device
from clues_flwr.core.trajectory import Checkpoint

log = logging.getLogger(__name__)

PRECONDITIONERS = ("adam", "adam-eps-inside", "sgd")


@dataclass(frozen=True)
class ScoreConfig:
    """How to score. ``paper()`` is the paper's equations 5-8; ``official()`` its code's."""

    layer: int = field(
        default=0,
        metadata={
            "key": "score-layer",
            "help": "transformer layer whose LoRA gradients are scored (the paper: 0, the first)",
        },
    )
    modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={
            "key": "score-modules",
            "help": "comma-separated modules of that layer whose LoRA A and B are scored",
        },
    )
    precondition: str = field(  # adam | adam-eps-inside | sgd
        default="adam",
        metadata={
            "help": "`adam` (paper eqs. 5-8), `adam-eps-inside` (the official code, LESS) or `sgd` (raw gradient)"
        },
    )
    bias_correction: bool = field(default=True, metadata={"help": "Adam bias correction of the moments in Γ"})
    precondition_validation: bool = field(  # paper eq. 6; the official code uses raw gradients
        default=True, metadata={"help": "precondition the validation side too (paper eq. 6; the official code: raw)"}
    )
    cosine: bool = field(
        default=True,
        metadata={"help": "unit-normalise Γ before the inner products (against length bias, per-site scale)"},
    )
    batch_size: int = field(
        default=32,
        metadata={
            "key": "score-batch-size",
            "help": "records per scoring batch (CLUES and baselines); no optimizer state, so it may exceed batch-size",
        },
    )

    def __post_init__(self):
        require("score-layer", self.layer, self.layer >= 0, "a layer index, 0 or more")
        require("score-modules", self.modules, bool(self.modules), "at least one module name, e.g. q_proj")
        one_of("precondition", self.precondition, PRECONDITIONERS)
        require("score-batch-size", self.batch_size, self.batch_size >= 1, "at least 1")

    @classmethod
    def paper(cls, **kw) -> "ScoreConfig":
        return cls(precondition="adam", bias_correction=True, precondition_validation=True, cosine=False, **kw)

    @classmethod
    def official(cls, **kw) -> "ScoreConfig":
        return cls(
            precondition="adam-eps-inside", bias_correction=False, precondition_validation=False, cosine=False, **kw
        )


def scoring_names(model, cfg: ScoreConfig) -> list[str]:
    """Names of the LoRA A and B weights of ``cfg.modules`` in transformer layer ``cfg.layer``.

    The block list is ``layers`` (Llama, Mistral, Qwen, OPT), ``h`` (GPT-2, Falcon, BLOOM)
    or ``blocks``; ``layers.0.`` is matched with its dots, so layer 0 never picks up 10, 11, ...
    """
    layer_re = re.compile(rf"(^|\.)(layers|h|blocks)\.{cfg.layer}\.")
    names = sorted(
        n
        for n, p in model.named_parameters()
        if p.requires_grad and layer_re.search(n) and any(f".{m}.lora_" in n for m in cfg.modules)
    )
    if not names:
        raise ValueError(f"no LoRA weights of {list(cfg.modules)} in layer {cfg.layer}: is LoRA attached there?")
    return names


@contextmanager
def capture(model, names: Sequence[str]):
    """Hooks that keep, per LoRA matrix, its input and the gradient of its output."""
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        module = model.get_submodule(name.removesuffix(".weight"))

        def hook(mod, args, out, name=name):
            inputs[name] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))

        handles.append(module.register_forward_hook(hook))
    try:
        yield inputs, grads
    finally:
        for h in handles:
            h.remove()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every next-token prediction and the mask of answer tokens
    (labels != -100), both [B, L − 1] over the positions ``logits`` covers (they may
    cover only the last positions of ``labels``)."""
    labels = labels[:, labels.shape[1] - logits.shape[1] + 1 :]
    token = F.cross_entropy(
        logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).transpose(1, 2),
        labels.clamp(min=0),
        reduction="none",
    )
    return token, (labels != -100).to(token.dtype)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over each sample's answer tokens: one per row."""
    token, mask = token_losses(logits, labels)
    return (token * mask).sum(1) / mask.sum(1).clamp(min=1)


@functools.cache
def takes_logits_to_keep(model_class: type) -> bool:
    """Whether a model class's forward accepts ``logits_to_keep``; asked once per class,
    not once per batch."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def answer_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward pass of a batch already on the model's device, logits asked for only from
    the position before the batch's first answer token on (``logits_to_keep``, where the
    model takes it): the prompt's logits never enter a loss, and with a large vocabulary
    they are the largest tensor of the pass."""
    labels = batch["labels"]
    answer = (labels != -100).any(0).nonzero()
    start = max(int(answer[0]) - 1, 0) if len(answer) else labels.shape[1] - 1
    base = getattr(model, "get_base_model", lambda: model)()
    keep = {"logits_to_keep": labels.shape[1] - start} if takes_logits_to_keep(type(base)) else {}
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **keep).logits


def answer_losses_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``per_sample_loss`` of a batch already on the model's device."""
    return per_sample_loss(answer_logits(model, batch), batch["labels"])


def scoring_mode(model) -> None:
    """Eval mode, so that scoring is deterministic: it switches off ``nn.Dropout`` modules
    and also the dropout models apply as a function gated on ``self.training`` (OPT's hidden
    states and layerdrop, Llama's ``attention_dropout``). bitsandbytes' 8-bit layers alone
    stay in training mode: they hold no randomness, and in eval mode they take an int8
    inference kernel on CPU that is slower and depends on the other rows of the batch."""
    model.eval()
    bnb = sys.modules.get("bitsandbytes")  # not imported: no 8-bit layer can exist
    for module in model.modules() if bnb else ():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.train()


def per_sample_grads(model, batch: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """Per-sample gradients of the named LoRA weights, flattened: [batch, d], at least float32.

    One forward and one backward of Σ_b loss_b; sample b's weight gradient is
    Σ_positions grad_out[b] ⊗ input[b]. Dropout is off; padding has zero output gradient
    and so adds nothing.
    """
    scoring_mode(model)
    batch = to_device(batch, model)
    params = dict(model.named_parameters())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else nullcontext()
    with capture(model, names) as (inputs, grads), autocast:
        loss = answer_losses_of(model, batch).sum()
        torch.autograd.grad(loss, [params[n] for n in names])
    out = []
    for name in names:
        dtype = torch.promote_types(grads[name].dtype, torch.float32)
        g, a = grads[name].to(dtype), inputs[name].to(dtype)
        out.append(torch.einsum("bto,bti->boi", g, a).reshape(g.shape[0], -1))
    return torch.cat(out, dim=1)


def flat(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1).float() for n in names])


def precondition(g: torch.Tensor, ckpt: Checkpoint, names: Sequence[str], cfg: ScoreConfig) -> torch.Tensor:
    """Γ: the AdamW update direction a single sample's gradient ``g`` [B, d] would cause
    from the checkpoint's moments (paper eqs. 5-8), so that θ_{t+1} = θ_t − η_t Γ, decoupled
    weight decay λθ_t included; or ``g`` itself for ``sgd`` (the official code's raw gradient)."""
    if cfg.precondition == "sgd":
        return g
    b1, b2 = ckpt.betas
    m = b1 * flat(ckpt.exp_avg, names).to(g) + (1 - b1) * g
    v = b2 * flat(ckpt.exp_avg_sq, names).to(g) + (1 - b2) * g * g
    if cfg.bias_correction:
        t = ckpt.step + 1
        m, v = m / (1 - b1**t), v / (1 - b2**t)
    step = m / (v.sqrt() + ckpt.eps) if cfg.precondition == "adam" else m / (v + ckpt.eps).sqrt()
    if ckpt.weight_decay:
        step = step + ckpt.weight_decay * flat(ckpt.adapter, [adapter_key(n) for n in names]).to(g)
    return step


def gamma_from_grads(
    g: torch.Tensor, ckpt: Checkpoint, names: Sequence[str], cfg: ScoreConfig, raw: bool = False
) -> torch.Tensor:
    """Γ from per-sample gradients [B, d]: preconditioned unless ``raw``, then unit rows if
    ``cfg.cosine``. Lets drivers cache raw gradients once and score many variants."""
    out = g if raw else precondition(g, ckpt, names, cfg)
    return F.normalize(out, dim=1) if cfg.cosine else out


def gammas(
    model,
    tokenizer,
    records: Sequence[Record],
    ckpt: Checkpoint,
    names: Sequence[str],
    cfg: ScoreConfig,
    max_len: int,
    raw: bool = False,
) -> torch.Tensor:
    """Γ(z; θ_t) of every record, [N, d]; ``raw`` skips preconditioning. ``max_len`` is the
    run's ``max-seq-len`` (``TrainConfig.max_seq_len``): a record is scored on the tokens it
    is traced and tuned on."""
    set_adapter_state(model, ckpt.adapter)
    return per_record(
        lambda batch: gamma_from_grads(per_sample_grads(model, batch, names), ckpt, names, cfg, raw),
        records,
        tokenizer,
        cfg.batch_size,
        max_len,
    )


def validation_sums(
    model, tokenizer, validation: Sequence[Record], trajectory: Sequence[Checkpoint], cfg: ScoreConfig, max_len: int
) -> list[torch.Tensor]:
    """G_t = Σ_{z' ∈ val} Γ(z'; θ_t) for each checkpoint, once: clients need only these."""
    names = scoring_names(model, cfg)
    raw = not cfg.precondition_validation
    return [gammas(model, tokenizer, validation, c, names, cfg, max_len, raw=raw).sum(0) for c in trajectory]


def along(trajectory: Sequence[Checkpoint], aligned: Iterable[torch.Tensor]) -> torch.Tensor:
    """S = Σ_t η_t · a_t in float64, ``aligned`` giving a_t (the records' alignment with G_t)
    checkpoint by checkpoint: the one sum over the trajectory every CLUES score is."""
    total = None
    for ckpt, a in zip(trajectory, aligned, strict=True):
        term = ckpt.lr * a.double().cpu()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("an empty trajectory scores nothing")
    return total


def scores(
    model,
    tokenizer,
    records: Sequence[Record],
    trajectory: Sequence[Checkpoint],
    val_sums: Sequence[torch.Tensor],
    cfg: ScoreConfig,
    max_len: int,
) -> torch.Tensor:
    """S(z) = Σ_t η_t ⟨G_t, Γ(z; θ_t)⟩ for every record, [N] in float64."""
    if len(trajectory) != len(val_sums):
        raise ValueError(f"{len(trajectory)} checkpoints but {len(val_sums)} validation sums")
    names = scoring_names(model, cfg)

    def aligned():
        for ckpt, g_val in zip(trajectory, val_sums):
            gamma = gammas(model, tokenizer, records, ckpt, names, cfg, max_len).double()
            yield gamma @ g_val.double().to(gamma.device)

    return along(trajectory, aligned())


def left_out(record_side: torch.Tensor, sum_side: torch.Tensor) -> torch.Tensor:
    """⟨G_t − Γ_val(v), Γ(v)⟩ for each validation record v (float64), G_t the sum of the rows
    of ``sum_side``: its alignment with the other validation records only."""
    r = record_side.double()
    return r @ sum_side.sum(0).double() - (r * sum_side.double()).sum(1)


def left_out_scores(
    model, tokenizer, validation: Sequence[Record], trajectory: Sequence[Checkpoint], cfg: ScoreConfig, max_len: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(G_t per checkpoint, S of every validation record with itself left out of G_t).

    The validation records belong to the clean reference every signal is standardised
    against, but each is one of the terms of G_t, and its own term ⟨Γ, Γ⟩ would align it
    with itself; left out, its score is one a clean record outside the set gets."""
    names = scoring_names(model, cfg)
    val_sums = []

    def aligned():
        for ckpt in trajectory:
            record_side = gammas(model, tokenizer, validation, ckpt, names, cfg, max_len)
            sum_side = (
                record_side
                if cfg.precondition_validation
                else gammas(model, tokenizer, validation, ckpt, names, cfg, max_len, raw=True)
            )
            val_sums.append(sum_side.sum(0))
            yield left_out(record_side, sum_side)

    own = along(trajectory, aligned())
    return val_sums, own

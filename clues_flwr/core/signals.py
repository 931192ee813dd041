"""The signals beside CLUES's S(z): the loss profile of each record's answer (its mean,
the paper's perplexity baseline; its end, its peak, its first token), IFD and FedDQC's IRA,
DataInf, random and the oracle.

Every scorer returns one float64 score per record with higher = keep, the convention of
CLUES's S(z), so the rules of ``core.threshold`` and ``core.combine`` apply to any of them
unchanged. Model-based scores are taken at whatever adapter the model holds. The loss
signals all come from one forward pass per record (``loss_profile``), and IFD's and IRA's
unprompted pass is made only when one of them is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from clues_flwr.core.adapter import set_adapter_state
from clues_flwr.core.data import Record, batches, encode_answer, per_record, to_device
from clues_flwr.core.pollution import HIGH
from clues_flwr.core.scoring import (
    ScoreConfig,
    answer_logits,
    answer_losses_of,
    per_sample_grads,
    scores,
    scoring_mode,
    token_losses,
)
from clues_flwr.core.trajectory import Checkpoint

GradStream = Callable[[], Iterable[torch.Tensor]]


class LossProfile(NamedTuple):
    """Per record, statistics of the NLL of its answer tokens (the end-of-answer token
    included), from one prompted forward pass; ``unprompted`` is the mean NLL of the same
    tokens with no prompt, s(A), when IFD or IRA needs it."""

    mean: torch.Tensor
    end: torch.Tensor
    peak: torch.Tensor
    head: torch.Tensor
    unprompted: torch.Tensor | None = None


def profile_of(token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, 4]: mean, last, largest and first answer-token loss of each row (``token_losses``)."""
    n = mask.sum(1).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(1).values.clamp(min=0)
    first = torch.where(mask > 0, positions, mask.shape[1]).min(1).values.clamp(max=mask.shape[1] - 1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    peak = torch.where(mask > 0, token, -torch.inf).max(1).values
    return torch.stack([(token * mask).sum(1) / n, token[rows, last], peak, token[rows, first]], 1)


@torch.no_grad()
def loss_profile(
    model, tokenizer, records: Sequence[Record], batch_size: int, max_len: int, unprompted: bool = False
) -> LossProfile:
    """The loss profile of every record, with the training template and masking; with
    ``unprompted`` also s(A), the answer's tokens scored with no prompt at all."""
    scoring_mode(model)

    def stats(batch):
        batch = to_device(batch, model)
        return profile_of(*token_losses(answer_logits(model, batch), batch["labels"]))

    columns = per_record(stats, records, tokenizer, batch_size, max_len).cpu().double().unbind(1)
    direct = None
    if unprompted:
        direct = per_record(
            lambda b: answer_losses_of(model, to_device(b, model)),
            records,
            tokenizer,
            batch_size,
            max_len,
            encode_answer,
        )
        direct = direct.cpu().double()
    return LossProfile(*columns, unprompted=direct)


def perplexity(p: LossProfile) -> torch.Tensor:
    """−log PPL, the mean answer-token loss: low perplexity is kept. The log ranks like PPL
    but keeps a reference mean from being dominated by one noisy record's exponentially
    large perplexity."""
    return -p.mean


def end_loss(p: LossProfile) -> torch.Tensor:
    """−the end-of-answer token's loss. A cut answer is a fluent prefix whose one wrong
    token is its early end: the mean over the answer dilutes that token, this sees only it."""
    return -p.end


def peak_loss(p: LossProfile) -> torch.Tensor:
    """−the largest answer-token loss. A deletion or a swapped word is one surprising
    token among fluent ones; the mean spreads it over the answer, the peak keeps it whole."""
    return -p.peak


def head_loss(p: LossProfile) -> torch.Tensor:
    """−the first answer token's loss. An exchanged answer is fluent and in-domain, but it
    answers another question, and the first token is where it commits to the wrong one;
    once it has, the rest follows from its own prefix and scores well."""
    return -p.head


def ifd(p: LossProfile) -> torch.Tensor:
    """−IFD, IFD = s(A|Q) / s(A): records whose question explains their answer are kept.

    A polluted answer (cut, exchanged, noise, another language) is one the question does
    not predict, so its IFD is near or above 1; a sound one is far below. Low IFD is
    therefore the direction that targets quality. Cherry LLM (Li et al.) instead keeps
    the highest IFD below 1, looking for difficult instructions rather than clean ones.
    """
    return -(p.mean / p.unprompted)


def ira(p: LossProfile) -> torch.Tensor:
    """FedDQC's instruction-response alignment (Du et al., ACL Findings 2025), IRA =
    s(A) − s(A|Q): how much the instruction lowers the answer's loss; high IRA is kept.
    The difference IFD takes as a ratio: an answer the question does not predict gains
    nothing from it, whatever its own fluency."""
    return p.unprompted - p.mean


LOSS_SIGNALS: dict[str, Callable[[LossProfile], torch.Tensor]] = {
    "perplexity": perplexity,
    "end-loss": end_loss,
    "peak-loss": peak_loss,
    "head-loss": head_loss,
    "ifd": ifd,
    "ira": ira,
}
UNPROMPTED = ("ifd", "ira")  # the signals that need s(A)
SIGNALS = ("clues", *LOSS_SIGNALS, "datainf", "random")  # what a selection combines
METHODS = (*LOSS_SIGNALS, "datainf", "random", "oracle")  # what ``signal_scores`` scores


def lora_names(model) -> list[str]:
    """Every trainable LoRA A and B weight, sorted so each module's A and B are adjacent."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and (".lora_A." in n or ".lora_B." in n))


def layer_slices(model, names: Sequence[str]) -> list[slice]:
    """DataInf's layers in the flattened gradient of ``names``: one per LoRA module, its
    A and B together."""
    params = dict(model.named_parameters())
    slices: list[slice] = []
    modules: list[str] = []
    start = 0
    for name in names:
        module = name.split(".lora_")[0]
        stop = start + params[name].numel()
        if modules and modules[-1] == module:
            slices[-1] = slice(slices[-1].start, stop)
        elif module in modules:
            raise ValueError(f"the LoRA weights of {module} are not adjacent in names: sort them")
        else:
            modules.append(module)
            slices.append(slice(start, stop))
        start = stop
    return slices


def _sums(grads: Iterable[torch.Tensor], slices: Sequence[slice]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(Σ_i g_i, Σ_i ||g_il||² per layer, n) over a stream of [B, d] gradient batches."""
    total, sq, n = 0, 0, 0
    for g in grads:
        g = g.double()
        total = total + g.sum(0)
        sq = sq + torch.stack([g[:, s].pow(2).sum() for s in slices])
        n += g.shape[0]
    if n == 0:
        raise ValueError("DataInf needs at least one record in the Hessian and validation sets")
    return total, sq, n


def direction_from_grads(
    hessian: GradStream, validation: GradStream | None, slices: Sequence[slice], damping: float = 0.1
) -> torch.Tensor:
    """DataInf's u, with I(z_k) = u · g_k, from streams of per-sample gradient batches.

    Per layer l, with the Hessian set's gradients g_il and the validation mean v_l,
    u_l = (w_l − v_l) / λ_l and w_l = (1/n) Σ_i (v_l·g_il) / (λ_l + ||g_il||²) g_il:
    that is −(1/n) Σ_i (g_il g_il^T + λ_l I)^{-1} v_l by Sherman-Morrison, DataInf's
    swap of the inverse and the mean. λ_l = damping · mean_i ||g_il||² / d_l, the mean
    squared gradient entry as in DataInf's code and paper. ``hessian`` is called twice,
    since w needs λ and so every norm first; ``validation`` None makes the Hessian set
    the validation set, and v then comes from the first of those two passes. Memory is
    one batch of gradients and a few d-vectors. A layer with no gradient on the Hessian
    set (lora_A while B = 0) has no curvature to invert and gets u_l = 0.
    """
    g_sum, sq_sum, n = _sums(hessian(), slices)
    if validation is None:
        v = g_sum / n
    else:
        val_sum, _, m = _sums(validation(), slices)
        v = val_sum / m
    lam = damping * sq_sum / n / torch.tensor([s.stop - s.start for s in slices], dtype=torch.float64, device=v.device)
    live = [(s, float(lam[i])) for i, s in enumerate(slices) if lam[i] > 0]
    w = torch.zeros_like(v)
    for g in hessian():
        g = g.double()
        for s, lam_l in live:
            gl = g[:, s]
            w[s] += ((gl @ v[s]) / (lam_l + gl.pow(2).sum(1))) @ gl
    u = torch.zeros_like(v)
    for s, lam_l in live:
        u[s] = (w[s] / n - v[s]) / lam_l
    return u.cpu()


def _grad_stream(model, tokenizer, records, names, batch_size, max_len) -> GradStream:
    return lambda: (per_sample_grads(model, b, names) for b in batches(records, tokenizer, batch_size, max_len))


def datainf_direction(
    model,
    tokenizer,
    validation: Sequence[Record],
    *,
    hessian: Sequence[Record] | None = None,
    batch_size: int,
    max_len: int,
    names: Sequence[str] | None = None,
    damping: float = 0.1,
) -> torch.Tensor:
    """DataInf's direction u [d] (float64, CPU) for the LoRA weights ``names``.

    Everything that depends on the Hessian and validation sets is in u, so the server can
    compute it once on public data (the validation set as Hessian set, the default) and
    send it: clients and anchors are then scored against one ruler and the anchor
    threshold means the same everywhere. The per-client variant, DataInf as published,
    passes the client's own records as ``hessian``.
    """
    names = list(names or lora_names(model))
    return direction_from_grads(
        _grad_stream(model, tokenizer, validation if hessian is None else hessian, names, batch_size, max_len),
        None if hessian is None else _grad_stream(model, tokenizer, validation, names, batch_size, max_len),
        layer_slices(model, names),
        damping,
    )


def datainf_scores(
    model,
    tokenizer,
    records: Sequence[Record],
    u: torch.Tensor,
    names: Sequence[str] | None = None,
    *,
    batch_size: int,
    max_len: int,
) -> torch.Tensor:
    """−I(z_k) = −u · g_k: a positive influence raises the validation loss, so it is dropped."""
    names = list(names or lora_names(model))
    if u.numel() != (d := sum(dict(model.named_parameters())[n].numel() for n in names)):
        raise ValueError(f"direction has {u.numel()} entries but the gradients of names have {d}")
    u = u.to(model.device, torch.float64)
    scores = per_record(
        lambda b: -(per_sample_grads(model, b, names).double() @ u), records, tokenizer, batch_size, max_len
    )
    return scores.cpu().double()


def random_scores(n: int, seed: int) -> torch.Tensor:
    """Uniform scores from a seeded generator: the random baseline."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def oracle_scores(records: Sequence[Record]) -> torch.Tensor:
    """1 for records labelled high quality, 0 otherwise: the selection a perfect scorer makes."""
    for i, r in enumerate(records):
        if "quality" not in r:
            raise ValueError(f"record {i} has no quality label: the oracle needs records whose truth is known")
    return torch.tensor([float(r["quality"] == HIGH) for r in records], dtype=torch.float64)


def signal_scores(
    signals: Sequence[str],
    model,
    tokenizer,
    records: Sequence[Record],
    *,
    batch_size: int,
    max_len: int,
    seed: int = 0,
    direction: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of every record by each of ``signals``; the loss signals share one forward
    pass (two when IFD or IRA is among them). DataInf needs ``direction`` from
    ``datainf_direction`` (the one the anchors were scored with)."""
    unknown = [m for m in signals if m not in METHODS]
    if unknown:
        raise ValueError(f"signal must be one of {METHODS}, got {unknown[0]!r}")
    out: dict[str, torch.Tensor] = {}
    losses = [m for m in signals if m in LOSS_SIGNALS]
    if losses:
        unprompted = any(m in UNPROMPTED for m in losses)
        profile = loss_profile(model, tokenizer, records, batch_size, max_len, unprompted)
        out.update({m: LOSS_SIGNALS[m](profile) for m in losses})
    for m in signals:
        if m == "random":
            out[m] = random_scores(len(records), seed)
        elif m == "oracle":
            out[m] = oracle_scores(records)
        elif m == "datainf":
            if direction is None:
                raise ValueError("datainf needs direction=: compute it once with datainf_direction")
            out[m] = datainf_scores(model, tokenizer, records, direction, names, batch_size=batch_size, max_len=max_len)
    return {m: out[m] for m in signals}


def scores_by_signal(
    signals: Sequence[str],
    model,
    tokenizer,
    records: Sequence[Record],
    score: ScoreConfig,
    max_len: int,
    *,
    adapter: dict[str, torch.Tensor] | None = None,
    trajectory: Sequence[Checkpoint] = (),
    val_sums: Sequence[torch.Tensor] = (),
    direction: torch.Tensor | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Every record's scores by each of ``signals``, as a site and the server both score:
    CLUES along ``trajectory`` with the validation sums G_t, every other signal at
    ``adapter`` (DataInf along ``direction``, ``random`` from ``seed``). The model is left
    at the last adapter it scored at."""
    out = {}
    if "clues" in signals:
        out["clues"] = scores(model, tokenizer, records, trajectory, val_sums, score, max_len)
    others = [s for s in signals if s != "clues"]
    if others:
        set_adapter_state(model, adapter)
        out.update(
            signal_scores(
                others,
                model,
                tokenizer,
                records,
                batch_size=score.batch_size,
                max_len=max_len,
                seed=seed,
                direction=direction,
            )
        )
    return {s: out[s] for s in signals}

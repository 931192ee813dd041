"""The signals beside CLUES's S(z): the paper's baseline scorers (Appendix E) perplexity,
IFD, DataInf, random and the oracle.

Every scorer returns one float64 score per record with higher = keep, the convention of
CLUES's S(z), so the rules of ``core.threshold`` and ``core.combine`` apply to any of them
unchanged. Model-based scores are taken at whatever adapter the model holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from clues_flwr.core.data import Record, batches, encode, encode_answer, per_record, to_device
from clues_flwr.core.pollution import HIGH
from clues_flwr.core.scoring import answer_losses_of, per_sample_grads, scoring_mode

METHODS = ("random", "perplexity", "ifd", "datainf", "oracle")

GradStream = Callable[[], Iterable[torch.Tensor]]


@torch.no_grad()
def answer_losses(
    model, tokenizer, records: Sequence[Record], batch_size: int, max_len: int, prompted: bool = True
) -> torch.Tensor:
    """Mean NLL of each record's answer tokens: s(A|Q) with the training template and
    masking, or with ``prompted=False`` s(A), the same tokens with no prompt at all."""
    scoring_mode(model)
    encoder = encode if prompted else encode_answer
    losses = per_record(
        lambda b: answer_losses_of(model, to_device(b, model)), records, tokenizer, batch_size, max_len, encoder
    )
    return losses.cpu().double()


def perplexity_scores(model, tokenizer, records: Sequence[Record], batch_size: int, max_len: int) -> torch.Tensor:
    """−log PPL: low perplexity is kept. The log ranks like PPL but keeps an anchor mean
    from being dominated by one noisy record's exponentially large perplexity."""
    return -answer_losses(model, tokenizer, records, batch_size, max_len)


def ifd_scores(model, tokenizer, records: Sequence[Record], batch_size: int, max_len: int) -> torch.Tensor:
    """−IFD, IFD = s(A|Q) / s(A): records whose question explains their answer are kept.

    A polluted answer (cut, exchanged, noise, another language) is one the question does
    not predict, so its IFD is near or above 1; a sound one is far below. Low IFD is
    therefore the direction that targets quality. Cherry LLM (Li et al.) instead keeps
    the highest IFD below 1, looking for difficult instructions rather than clean ones.
    """
    conditioned = answer_losses(model, tokenizer, records, batch_size, max_len)
    direct = answer_losses(model, tokenizer, records, batch_size, max_len, prompted=False)
    return -(conditioned / direct)


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


def baseline_scores(
    method: str,
    model,
    tokenizer,
    records: Sequence[Record],
    *,
    batch_size: int,
    max_len: int,
    seed: int = 0,
    direction: torch.Tensor | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """Scores of ``method`` for every record; DataInf needs ``direction`` from
    ``datainf_direction`` (the one the anchors were scored with)."""
    if method == "random":
        return random_scores(len(records), seed)
    if method == "oracle":
        return oracle_scores(records)
    if method == "perplexity":
        return perplexity_scores(model, tokenizer, records, batch_size, max_len)
    if method == "ifd":
        return ifd_scores(model, tokenizer, records, batch_size, max_len)
    if method == "datainf":
        if direction is None:
            raise ValueError("datainf needs direction=: compute it once with datainf_direction")
        return datainf_scores(model, tokenizer, records, direction, names, batch_size=batch_size, max_len=max_len)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")

"""Aggregation of client tensors, as pure functions over ``dict[str, Tensor]``.

Every method computes in float64 (sums over many clients lose digits in float32) and returns
float32 (what Flower's ArrayRecord and the adapter carry). Weights are the clients' example
counts; they are normalised here, so any positive scale gives the same result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]

AGGREGATIONS = ("fedavg", "ties", "task-arithmetic", "exact")


def _weights(states: Sequence[State], weights: Sequence[float], name: str) -> list[float]:
    """Validated weights summing to 1, after checking all states share keys and shapes."""
    if not states or len(states) != len(weights):
        raise ValueError(f"{name} needs one weight per state, got {len(states)} states and {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"{name} weights must be finite and non-negative, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"{name} weights sum to zero: no client trained on any example")
    first = states[0]
    for i, s in enumerate(states[1:], start=1):
        if set(s) != set(first):
            diff = sorted(set(s) ^ set(first))
            raise ValueError(f"{name}: state {i} and state 0 have different keys, e.g. {diff[:3]}")
        for k, v in first.items():
            if s[k].shape != v.shape:
                raise ValueError(f"{name}: {k} has shape {tuple(s[k].shape)} in state {i}, {tuple(v.shape)} in state 0")
    return [x / total for x in w]


def _mean(states: Sequence[State], w: Sequence[float], key: str) -> torch.Tensor:
    return sum(wi * s[key].double() for s, wi in zip(states, w))


def fedavg(states: Sequence[State], weights: Sequence[float]) -> State:
    """Weighted mean of same-keyed tensors (weights: the clients' example counts)."""
    w = _weights(states, weights, "fedavg")
    return {k: _mean(states, w, k).float() for k in states[0]}


def _trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the round(density * numel) largest-magnitude entries (at least one), zero the rest.

    A stable sort breaks ties at the cut by position (earlier entry kept), so the result never
    depends on the sort backend.
    """
    flat = t.flatten()
    k = max(1, round(float(density) * flat.numel()))
    if k >= flat.numel():
        return t.clone()
    keep = torch.argsort(flat.abs(), descending=True, stable=True)[:k]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(t)


def _ties64(deltas: Sequence[State], weights: Sequence[float], density: float) -> State:
    try:
        ok = 0 < float(density) <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"ties density must be in (0, 1], got {density!r}")
    w = _weights(deltas, weights, "ties")
    merged = {}
    for k in deltas[0]:
        trimmed = torch.stack([_trim(d[k].double(), density) for d in deltas])
        wt = torch.tensor(w, dtype=torch.float64).view(-1, *([1] * (trimmed.dim() - 1)))
        elected = torch.sign((wt * trimmed).sum(0))
        # sign 0 (no mass, or an exact tie) matches no non-zero entry, so those entries merge to 0
        agree = (trimmed != 0) & (torch.sign(trimmed) == elected)
        mass = (wt * agree).sum(0)
        merged[k] = torch.where(mass > 0, (wt * agree * trimmed).sum(0) / mass.clamp_min(1e-300), 0.0)
    return merged


def ties(deltas: Sequence[State], weights: Sequence[float], density: float) -> State:
    """TIES-merging (Yadav et al. 2023) of client updates; the caller adds the result to the global.

    Per tensor: trim each client's delta to its top-``density`` entries by magnitude, elect each
    entry's sign from the weighted sum of the trimmed deltas, and average (weighted) only the
    clients that agree with it. Small and sign-conflicting updates would otherwise cancel or
    dilute the ones that carry the direction; an entry no client agrees on stays 0.
    """
    return {k: v.float() for k, v in _ties64(deltas, weights, density).items()}


def task_arithmetic(states: Sequence[State], weights: Sequence[float]) -> State:
    """The CLUES paper's LoRA merge (eqs. 9-10): A = sum_i sqrt(w_i) A_i, B = sum_i sqrt(w_i) B_i.

    w_i are normalised to sum to 1; keys that are neither ``lora_A`` nor ``lora_B`` get the plain
    weighted mean. The factors are merged separately, so the merged B A equals
    sum_ij sqrt(w_i w_j) B_i A_j, not the weighted mean of the B_i A_i: the cross terms i != j stay.
    For identical clients that makes B A grow by (sum_i sqrt(w_i))^2, i.e. n for n equal weights;
    only one client holding all the weight reproduces its B A exactly.
    """
    w = _weights(states, weights, "task-arithmetic")
    root = [math.sqrt(x) for x in w]
    return {
        k: (_mean(states, root, k) if ("lora_A" in k or "lora_B" in k) else _mean(states, w, k)).float()
        for k in states[0]
    }


def _lora_pairs(keys) -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) per module, paired by name; a factor without its partner is an error."""
    keys = set(keys)
    pairs = []
    for k in sorted(keys):
        if "lora_A" in k:
            partner = k.replace("lora_A", "lora_B")
            if partner not in keys:
                raise ValueError(f"exact: {k} has no matching {partner}")
            pairs.append((k, partner))
        elif "lora_B" in k and k.replace("lora_B", "lora_A") not in keys:
            raise ValueError(f"exact: {k} has no matching {k.replace('lora_B', 'lora_A')}")
    return pairs


def _svd_of_sum(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of b @ a ([out, m] @ [m, in]) without forming it: QR both sides, decompose the small core.

    sum_i w_i B_i A_i is one product of the stacked factors, and with m = n r much smaller than
    out and in this costs O((out + in) m^2) instead of an SVD of the full out x in matrix.
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, sv, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return qb @ u, sv, vh @ qa.T


def exact_delta(states: Sequence[State], weights: Sequence[float], rank: int | None = None) -> State:
    """Merge LoRA modules on the product: Delta W = sum_i w_i B_i A_i, refactored by truncated SVD.

    Averaging A and B separately (FedAvg) does not average the updates B_i A_i the clients
    learned; this does, up to the best rank-``rank`` approximation (Eckart-Young). The factors are
    returned balanced, B = U sqrt(S) and A = sqrt(S) V^T, in the clients' shapes [out, r] and
    [r, in]; for rank < r the unused rows of A and columns of B are 0. ``rank`` defaults to each
    module's r and cannot exceed it. Non-LoRA keys get the weighted mean. Note that the new
    factors are in a different basis than any client's, so per-factor state such as optimizer
    moments no longer lines up with them.
    """
    w = _weights(states, weights, "exact")
    pairs = _lora_pairs(states[0])
    merged: State = {}
    for ka, kb in pairs:
        a0, b0 = states[0][ka], states[0][kb]
        if a0.dim() != 2 or b0.dim() != 2 or b0.shape[1] != a0.shape[0]:
            raise ValueError(f"exact: {ka} {tuple(a0.shape)} and {kb} {tuple(b0.shape)} are not [r, in] and [out, r]")
        r = a0.shape[0]
        k = r if rank is None else int(rank)
        if not 1 <= k <= r:
            raise ValueError(f"exact: rank must be in [1, {r}] (the adapter's r for {ka}), got {rank}")
        u, sv, vh = _svd_of_sum(
            torch.cat([wi * s[kb].double() for s, wi in zip(states, w)], dim=1),
            torch.cat([s[ka].double() for s in states], dim=0),
        )
        k = min(k, sv.numel())
        root = sv[:k].sqrt()
        a = torch.zeros(r, a0.shape[1], dtype=torch.float64)
        b = torch.zeros(b0.shape[0], r, dtype=torch.float64)
        a[:k] = root[:, None] * vh[:k]
        b[:, :k] = u[:, :k] * root
        merged[ka], merged[kb] = a.float(), b.float()
    for key in states[0]:
        if key not in merged:
            merged[key] = _mean(states, w, key).float()
    return merged


def aggregate(
    method: str,
    states: Sequence[State],
    weights: Sequence[float],
    *,
    base: State | None = None,
    density: float | None = None,
    rank: int | None = None,
) -> State:
    """The new global adapter from the clients' adapters by ``method`` (one of ``AGGREGATIONS``).

    ``ties`` merges updates, so it needs ``base`` (the global adapter the clients started from):
    it returns base + ties(state - base). ``density`` is used only by ties, ``rank`` only by exact.
    """
    if method == "fedavg":
        return fedavg(states, weights)
    if method == "task-arithmetic":
        return task_arithmetic(states, weights)
    if method == "exact":
        return exact_delta(states, weights, rank)
    if method == "ties":
        if base is None or density is None:
            raise ValueError("ties merges updates: pass base (the global adapter the clients started from) and density")
        reason = next((r for r in (check_state(s, base) for s in states) if r), None)
        if reason:
            raise ValueError(f"ties: a state does not match base: {reason}")
        deltas = [{k: s[k].double() - base[k].double() for k in base} for s in states]
        delta = _ties64(deltas, weights, density)
        return {k: (base[k].double() + delta[k]).float() for k in base}
    raise ValueError(f"unknown aggregation method {method!r}: use one of {', '.join(AGGREGATIONS)}")


def check_state(state: State, reference: State) -> str | None:
    """Why a client's adapter cannot be aggregated (keys, shapes, NaN/Inf vs ``reference``), or None.

    One bad reply would otherwise poison every mean it enters, so the server drops it instead.
    """
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing:
        return f"{len(missing)} missing key(s), e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} unexpected key(s), e.g. {extra[0]}"
    for k, ref in reference.items():
        v = state[k]
        if not isinstance(v, torch.Tensor):
            return f"{k} is a {type(v).__name__}, not a tensor"
        if v.shape != ref.shape:
            return f"{k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
        if v.is_floating_point() and not torch.isfinite(v).all():
            return f"{k} has {int((~torch.isfinite(v)).sum())} non-finite value(s) (NaN/Inf)"
    return None

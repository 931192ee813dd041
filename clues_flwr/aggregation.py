"""Aggregation of client tensors, as pure functions over ``dict[str, Tensor]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fedavg(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of same-keyed tensors (weights: the clients' example counts)."""
    if not states or len(states) != len(weights):
        raise ValueError(f"fedavg needs one weight per state, got {len(states)} states and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights sum to zero: no client trained on any example")
    return {k: sum(w / total * s[k].double() for s, w in zip(states, weights)).float() for k in states[0]}

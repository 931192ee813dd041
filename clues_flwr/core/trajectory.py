"""Trajectory checkpoints: what CLUES needs of a training run to score a sample later.

A checkpoint holds the adapter θ_t, the AdamW moments (m_t, v_t, step) of the scoring
layer's parameters, the learning rate η_t and the weight decay λ (AdamW's update has a
λθ_t term, paper eq. 5). Moments are keyed by parameter name, never
by position in the optimizer, so a checkpoint stays valid whatever order the optimizer's
parameter groups had. Saving one is the run folder's business (``demo/state.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Checkpoint:
    """One point of a trajectory.

    Parameters
    ----------
    adapter : dict[str, Tensor]
        θ_t, the LoRA weights (PEFT state-dict names).
    exp_avg, exp_avg_sq : dict[str, Tensor]
        m_t and v_t of the scoring layer's parameters, by parameter name.
    step, lr, weight_decay : int, float, float
        AdamW's step count (for bias correction), η_t and λ.
    round : int
        The trace round (or local checkpoint) it comes from.
    betas, eps : tuple[float, float], float
        AdamW's.
    meta : dict
        Anything else worth keeping with it (JSON).
    """

    adapter: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: int
    lr: float
    weight_decay: float = 0.0
    round: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    meta: dict = field(default_factory=dict)


def moments(model, optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict, int]:
    """(m, v, step) of the named parameters from an AdamW optimizer's state.

    A parameter the optimizer has not stepped yet has zero moments and step 0.
    """
    params = dict(model.named_parameters())
    m, v, steps = {}, {}, set()
    for name in names:
        state = optimizer.state.get(params[name])
        if state:
            m[name] = state["exp_avg"].detach().float().cpu().clone()
            v[name] = state["exp_avg_sq"].detach().float().cpu().clone()
        else:
            m[name], v[name] = torch.zeros(params[name].shape), torch.zeros(params[name].shape)
        steps.add(int(state["step"]) if state else 0)
    if len(steps) > 1:
        raise ValueError(f"scoring parameters were stepped a different number of times: {sorted(steps)}")
    return m, v, steps.pop() if steps else 0


def checkpoint(model, optimizer, names: list[str], adapter: dict[str, torch.Tensor], round: int = 0) -> Checkpoint:
    """Snapshot of a run after ``optimizer``'s last step (lr, betas, eps from its group)."""
    m, v, step = moments(model, optimizer, names)
    group = optimizer.param_groups[0]
    return Checkpoint(
        adapter=adapter,
        exp_avg=m,
        exp_avg_sq=v,
        step=step,
        lr=float(group["lr"]),
        weight_decay=float(group["weight_decay"]),
        round=round,
        betas=tuple(group["betas"]),
        eps=float(group["eps"]),
    )

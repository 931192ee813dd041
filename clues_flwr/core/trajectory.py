"""Trajectory checkpoints: what CLUES needs of a training run to score a sample later.

A checkpoint holds the adapter θ_t, the AdamW moments (m_t, v_t, step) of the scoring
layer's parameters, the learning rate η_t and the weight decay λ (AdamW's update has a
λθ_t term, paper eq. 5). Moments are keyed by parameter name, never
by position in the optimizer, so a checkpoint stays valid whatever order the optimizer's
parameter groups had.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


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


def save(ckpt: Checkpoint, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt.adapter.items()}, folder / "adapter.safetensors")
    tensors = {f"exp_avg/{k}": v for k, v in ckpt.exp_avg.items()}
    tensors.update({f"exp_avg_sq/{k}": v for k, v in ckpt.exp_avg_sq.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "moments.safetensors")
    info = {
        "step": ckpt.step,
        "lr": ckpt.lr,
        "weight_decay": ckpt.weight_decay,
        "round": ckpt.round,
        "betas": list(ckpt.betas),
        "eps": ckpt.eps,
        "meta": ckpt.meta,
    }
    (folder / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")


def load(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    missing = [
        f for f in ("adapter.safetensors", "moments.safetensors", "checkpoint.json") if not (folder / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {folder} lacks {', '.join(missing)}")
    info = json.loads((folder / "checkpoint.json").read_text())
    tensors = load_file(folder / "moments.safetensors")
    return Checkpoint(
        adapter=load_file(folder / "adapter.safetensors"),
        exp_avg={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg/")},
        exp_avg_sq={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg_sq/")},
        step=int(info["step"]),
        lr=float(info["lr"]),
        weight_decay=float(info["weight_decay"]),
        round=int(info["round"]),
        betas=tuple(info["betas"]),
        eps=float(info["eps"]),
        meta=info.get("meta", {}),
    )

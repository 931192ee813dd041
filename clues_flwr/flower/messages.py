"""What CLUES messages carry, encoded for Flower records and decoded on the other side.

Both directions are defined here so a site can audit them in one place:

server → client, ``train.clues_trace``: the global adapter (``arrays``) and a config of
    hyperparameters and ``phase`` (``trace``, or ``trace-local`` in merge mode).
client → server, ``train.clues_trace``: the trained adapter and the scoring layer's AdamW
    moments (``moments``) or, in merge mode, the whole local trajectory; metrics
    ``train-loss``, ``num-examples`` (records trained on) and ``adam-step``.
server → client, ``train`` (tuning, the project's own handler): the global adapter and the
    hyperparameters with ``clues-selection``, the selection to train on.
client → server, ``train``: the trained adapter; ``train-loss`` and ``num-examples``.
server → client, ``query.clues_score``: the selection's name (``clues``, a baseline, or
    signals joined by ``+``), the histogram edges and, per signal, what it scores with:
    for CLUES the trajectory (adapters, scoring-layer moments), the validation sums G_t, η_t
    and the scoring settings; for a baseline the initial adapter, batch size, length and
    seed, and for DataInf the direction u computed on the public validation set; for a
    combination the rule (``combination``) and each signal's mean and spread on the public
    clean reference (``reference-<signal>``, two numbers: no public record's score either).
client → server, ``query.clues_score``: counts only: ``total`` and a histogram of the
    site's scores over the server's fixed edges. The scores stay on the node.
server → client, ``query.clues_threshold``: τ, or the keep ratio.
client → server, ``query.clues_threshold``: counts only: ``kept``, ``total`` and, when records
    carry a quality label, ``tp fp fn tn``.
client → server, ``evaluate``: ``heldout-loss`` and ``num-examples`` of the site's held-out
    records and, when they carry quality labels, the loss and count of the clean ones.

No sample and no per-sample score is ever encoded.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clues_flwr.core.trajectory import Checkpoint

# CLUES's own message types, beside a project's ``train``/``evaluate``: Flower routes
# ``train.<action>`` and ``query.<action>`` to the handlers registered for that action.
TRACE_ACTION, SCORE_ACTION, THRESHOLD_ACTION = "clues_trace", "clues_score", "clues_threshold"
TRACE_MESSAGE, SCORE_MESSAGE = f"train.{TRACE_ACTION}", f"query.{SCORE_ACTION}"
THRESHOLD_MESSAGE = f"query.{THRESHOLD_ACTION}"
# In a tuning round's train config (as FedProx adds ``proximal-mu``): which selection to train on.
SELECTION_FLAG = "clues-selection"
CHECKPOINT_PREFIX = "checkpoint-"
TRAJECTORY_KEY = "trajectory"
SCORE_CONFIG_KEY = "score-config"
MOMENTS_KEY = "moments"
DIRECTION_KEY = "direction"
# evaluate replies of labelled sites (benchmarks): the held-out loss on clean records alone
CLEAN_LOSS_KEY, CLEAN_EXAMPLES_KEY = "heldout-clean-loss", "heldout-clean-examples"


def moments_record(exp_avg: dict[str, torch.Tensor], exp_avg_sq: dict[str, torch.Tensor]) -> ArrayRecord:
    tensors = {f"exp_avg/{k}": v for k, v in exp_avg.items()}
    tensors.update({f"exp_avg_sq/{k}": v for k, v in exp_avg_sq.items()})
    return ArrayRecord({k: v.float().contiguous() for k, v in tensors.items()})


def moments_from(record: ArrayRecord) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors = record.to_torch_state_dict()
    return _strip(tensors, "exp_avg/"), _strip(tensors, "exp_avg_sq/")


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def trajectory_records(trajectory: list[Checkpoint], val_sums: list[torch.Tensor] | None = None) -> dict:
    """One ArrayRecord per checkpoint (adapter, moments, G_t if given) and one ConfigRecord
    with the per-checkpoint scalars, as entries of a RecordDict."""
    out = {}
    for t, ckpt in enumerate(trajectory):
        tensors = {f"adapter/{k}": v.float().contiguous() for k, v in ckpt.adapter.items()}
        tensors.update(moments_record(ckpt.exp_avg, ckpt.exp_avg_sq).to_torch_state_dict())
        if val_sums is not None:
            tensors["validation-sum"] = val_sums[t].float().cpu().contiguous()
        out[f"{CHECKPOINT_PREFIX}{t}"] = ArrayRecord(tensors)
    out[TRAJECTORY_KEY] = ConfigRecord(
        {
            "lr": [float(c.lr) for c in trajectory],
            "weight-decay": [float(c.weight_decay) for c in trajectory],
            "step": [int(c.step) for c in trajectory],
            "round": [int(c.round) for c in trajectory],
            "beta1": [float(c.betas[0]) for c in trajectory],
            "beta2": [float(c.betas[1]) for c in trajectory],
            "eps": [float(c.eps) for c in trajectory],
        }
    )
    return out


def trajectory_from(content: RecordDict) -> tuple[list[Checkpoint], list[torch.Tensor]]:
    """Checkpoints and validation sums (empty list when the sender sent none)."""
    if TRAJECTORY_KEY not in content:
        raise ValueError("message carries no trajectory")
    info = content[TRAJECTORY_KEY]
    trajectory, val_sums = [], []
    for t in range(len(info["lr"])):
        tensors = content[f"{CHECKPOINT_PREFIX}{t}"].to_torch_state_dict()
        trajectory.append(
            Checkpoint(
                adapter=_strip(tensors, "adapter/"),
                exp_avg=_strip(tensors, "exp_avg/"),
                exp_avg_sq=_strip(tensors, "exp_avg_sq/"),
                step=int(info["step"][t]),
                lr=float(info["lr"][t]),
                weight_decay=float(info["weight-decay"][t]),
                round=int(info["round"][t]),
                betas=(float(info["beta1"][t]), float(info["beta2"][t])),
                eps=float(info["eps"][t]),
            )
        )
        if "validation-sum" in tensors:
            val_sums.append(tensors["validation-sum"])
    return trajectory, val_sums

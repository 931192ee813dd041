"""CLUES data selection for federated LoRA fine-tuning, on Flower.

The public API, for a Flower project of its own::

    from clues_flwr import CluesClient, CluesSelection, CluesTuning, Site, selected_records, train_reply

Names load on first use, so ``clues_flwr.core`` (the maths) imports without Flower.
"""

from __future__ import annotations

import importlib
import logging

# bitsandbytes' noise, silenced here because every clues_flwr import runs this first, whichever
# module then imports peft or transformers (which import bitsandbytes): on CPU it says on import,
# once per process or Ray actor, that an optional kernel package for 4-bit matmuls is missing
# (8-bit LoRA does not use it), and it logs on every 8-bit matmul that fp32 inputs are cast to
# fp16 (always so on CPU), one line per layer per step.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "from kernels-community" not in record.getMessage()
)
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")
)

_EXPORTS = {
    "CluesSelection": "clues_flwr.flower.selection",
    "SelectionReport": "clues_flwr.flower.selection",
    "PublicRecords": "clues_flwr.flower.selection",
    "CluesTuning": "clues_flwr.flower.tuning",
    "FedTies": "clues_flwr.flower.tuning",
    "FedTaskArithmetic": "clues_flwr.flower.tuning",
    "FedExact": "clues_flwr.flower.tuning",
    "CluesClient": "clues_flwr.flower.client",
    "Site": "clues_flwr.flower.client",
    "selected_records": "clues_flwr.flower.client",
    "train_reply": "clues_flwr.flower.client",
    "evaluate_reply": "clues_flwr.flower.client",
    "Rounds": "clues_flwr.flower.state",
    "AppConfig": "clues_flwr.config",
    "SelectionConfig": "clues_flwr.config",
    "FederationConfig": "clues_flwr.config",
    "TuneConfig": "clues_flwr.config",
    "ScoreConfig": "clues_flwr.core.scoring",
    "TrainConfig": "clues_flwr.core.train",
    "demo_model_path": "clues_flwr.model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clues_flwr' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__

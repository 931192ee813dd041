"""CLUES data selection for federated LoRA fine-tuning, on Flower.

The public API is what a Flower project of its own needs (docs/integration.md)::

    from clues_flwr import CluesClient, CluesSelection, CluesTuning, Site, selected_records, train_reply

Names load on first use, so ``clues_flwr.core`` (the maths) imports without Flower. An import
of a module that has moved fails with its new place.
"""

from __future__ import annotations

import importlib
import logging
import sys

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
    "CluesClient": "clues_flwr.flower.client",
    "Site": "clues_flwr.flower.client",
    "selected_records": "clues_flwr.flower.client",
    "train_reply": "clues_flwr.flower.client",
    "evaluate_reply": "clues_flwr.flower.client",
    "adapter_arrays": "clues_flwr.flower.adapter",
    "CluesSelection": "clues_flwr.flower.selection",
    "SelectionReport": "clues_flwr.flower.report",
    "CluesTuning": "clues_flwr.flower.tuning",
    "ScoreConfig": "clues_flwr.core.scoring",
    "TrainConfig": "clues_flwr.core.train",
    "SelectionConfig": "clues_flwr.config",
    "TuneConfig": "clues_flwr.config",
    "FederationConfig": "clues_flwr.config",
    "demo_model_path": "clues_flwr.model",
}
__all__ = sorted(_EXPORTS)

# Modules that have moved, and where to: docs/integration.md's migration note lists each.
_MOVED = {
    "clues_flwr.aggregation": "clues_flwr.core.aggregation",
    "clues_flwr.baselines": "clues_flwr.core.signals",
    "clues_flwr.bench": "clues_flwr.harness.bench",
    "clues_flwr.calibrate": "clues_flwr.core.threshold",
    "clues_flwr.checks": "clues_flwr.core.checks",
    "clues_flwr.client_app": "clues_flwr.flower.client",
    "clues_flwr.combine": "clues_flwr.core.combine",
    "clues_flwr.data": "clues_flwr.core.data",
    "clues_flwr.flower.messages": "clues_flwr.flower.protocol",
    "clues_flwr.flower.plots": "clues_flwr.demo.plots",
    "clues_flwr.flower.state": "clues_flwr.demo.state",
    "clues_flwr.flower.threads": "clues_flwr.demo.threads",
    "clues_flwr.flower.timing": "clues_flwr.demo.timing",
    "clues_flwr.local_grid": "clues_flwr.harness.local_grid",
    "clues_flwr.log": "clues_flwr.flower.log",
    "clues_flwr.messages": "clues_flwr.flower.protocol",
    "clues_flwr.metrics": "clues_flwr.core.metrics",
    "clues_flwr.pollution": "clues_flwr.core.pollution",
    "clues_flwr.pretrain": "clues_flwr.harness.pretrain",
    "clues_flwr.report": "clues_flwr.demo.state",
    "clues_flwr.results": "clues_flwr.harness.results",
    "clues_flwr.resume": "clues_flwr.demo.state",
    "clues_flwr.scoring": "clues_flwr.core.scoring",
    "clues_flwr.screen": "clues_flwr.flower.exchange",
    "clues_flwr.selection": "clues_flwr.flower.selection",
    "clues_flwr.server_app": "clues_flwr.demo.server_app",
    "clues_flwr.simulate": "clues_flwr.harness.simulate",
    "clues_flwr.strategy": "clues_flwr.flower.tuning",
    "clues_flwr.threads": "clues_flwr.demo.threads",
    "clues_flwr.timing": "clues_flwr.demo.timing",
    "clues_flwr.train": "clues_flwr.core.train",
    "clues_flwr.trajectory": "clues_flwr.core.trajectory",
}


class _Moved:
    """Last on ``sys.meta_path``, so asked only about a module no other finder found: a moved
    one fails with its new place instead of a bare ``No module named``."""

    @staticmethod
    def find_spec(name: str, path=None, target=None):
        if name in _MOVED:
            # no ``name=`` on the error: ``from clues_flwr import scoring`` would swallow it
            raise ModuleNotFoundError(
                f"{name} has moved to {_MOVED[name]} (docs/integration.md, 'Migrating', lists every move)"
            )
        return None


sys.meta_path.append(_Moved)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clues_flwr' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__

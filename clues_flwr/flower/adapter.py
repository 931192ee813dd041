"""The LoRA adapter as Flower's ArrayRecord, the form a strategy's initial arrays and a
tuning reply carry it in."""

from __future__ import annotations

from flwr.app import ArrayRecord

from clues_flwr.core.adapter import adapter_state


def adapter_arrays(model) -> ArrayRecord:
    """``model``'s LoRA weights, copied as float32 CPU tensors (``adapter_state``), so that
    later training does not change what was sent."""
    return ArrayRecord(adapter_state(model))

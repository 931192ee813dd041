"""The LoRA adapter's weights as plain tensors, read from and written into any PEFT model.

Scoring sets each checkpoint's adapter on the model it is given, so these live in the core;
loading a model is the caller's business (``clues_flwr.model`` for the demo).
"""

from __future__ import annotations

import re

import torch


def adapter_state(model) -> dict[str, torch.Tensor]:
    """A copy of the LoRA weights as float32 CPU tensors (Flower's ArrayRecord has no bf16);
    a copy, since on a float32 CPU model ``.to`` would return the live parameters."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32, copy=True).contiguous()
        for k, v in get_peft_model_state_dict(model).items()
    }


def adapter_key(name: str) -> str:
    """The key in ``adapter_state`` of a LoRA parameter name: PEFT saves
    ``….lora_A.<adapter>.weight`` as ``….lora_A.weight``."""
    return re.sub(r"\.(lora_[AB])\.[^.]+\.", r".\1.", name)


def set_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights; a missing, extra or misshapen tensor is an error."""
    from peft import set_peft_model_state_dict

    expected = adapter_state(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"adapter tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    set_peft_model_state_dict(model, state)

"""Checks of configuration values: one error that names the key, the value and what is
allowed (the keys are the run config's, so a message points at what to change)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def require(key: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key} must be {allowed}, got {value!r}")


def one_of(key: str, value: Any, choices: Collection) -> None:
    require(key, value, value in choices, f"one of {', '.join(map(repr, choices))}")


def at_least(section: Any, least: int, *keys: str) -> None:
    """Each of ``keys``, run-config names of ``section``'s fields, is at least ``least``."""
    for key in keys:
        value = getattr(section, key.replace("-", "_"))
        require(key, value, value >= least, f"at least {least}")

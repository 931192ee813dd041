"""Combined selection scores: several signals (CLUES, the loss profile, IFD, …) on one scale.

Each signal is standardised against the public clean reference, the validation set and the
anchors (and any clean records a user adds): z = (s − mean_ref) / spread_ref. The reference
is clean and public, so every site and the server put the same signal on the same scale,
and one global τ on the combined score means the same thing at every site; sites are sent
only each signal's two numbers. Signals fail on different pollution kinds (the mean answer
loss dilutes a cut answer's one wrong token, the end-of-answer loss sees nothing but that
token), so a record's combined score is their sum (``sum``: a weak signal is outvoted) or
their minimum (``min``: a record must look clean to every signal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

COMBINATIONS = ("sum", "min")

SPREAD_FLOOR = 1e-9  # relative to the reference scores' magnitude: below it their spread is rounding noise


def reference_of(scores: torch.Tensor) -> tuple[float, float]:
    """(mean, spread) of one signal's scores on the clean reference. A spread below
    ``SPREAD_FLOOR`` × the scores' largest magnitude is refused: the reference cannot tell
    records apart, and dividing by its rounding noise would let this one signal decide any
    combination alone (z ≈ ±1000 for scores agreeing to 1e-14)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if s.numel() < 2:
        raise ValueError("standardising against the reference needs at least 2 reference scores")
    if not torch.isfinite(s).all():
        raise ValueError(f"{int((~torch.isfinite(s)).sum())} of {s.numel()} reference scores are not finite")
    spread, scale = float(s.std()), float(s.abs().max())
    if not spread > SPREAD_FLOOR * scale:
        raise ValueError(
            f"the reference scores' spread {spread:.3g} is below {SPREAD_FLOOR:g} of their scale {scale:.3g}: "
            "they do not vary, so this signal cannot be standardised against them"
        )
    return float(s.mean()), spread


def references(scores: Mapping[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """``reference_of`` for each signal's reference scores; an error names the signal."""
    out = {}
    for name, s in scores.items():
        try:
            out[name] = reference_of(s)
        except ValueError as err:
            raise ValueError(f"signal {name!r}: {err}") from err
    return out


def standardise(scores: torch.Tensor, mean: float, spread: float) -> torch.Tensor:
    """``scores`` in units of the reference's spread around its mean (float64)."""
    return (torch.as_tensor(scores, dtype=torch.float64) - mean) / spread


def combine(standardised: Sequence[torch.Tensor], rule: str) -> torch.Tensor:
    """One score per record from the standardised signals."""
    if rule not in COMBINATIONS:
        raise ValueError(f"combination rule must be one of {COMBINATIONS}, got {rule!r}")
    stacked = torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in standardised])
    return stacked.sum(0) if rule == "sum" else stacked.min(0).values


def combined(signals: Mapping[str, torch.Tensor], reference: Mapping[str, Sequence[float]], rule: str):
    """The selection score of records scored by every signal in ``signals``: one signal as
    it is; several each standardised by its ``reference`` (mean, spread) and combined by
    ``rule``. The server, every site and every driver score through this."""
    if len(signals) == 1:
        return torch.as_tensor(next(iter(signals.values())), dtype=torch.float64)
    missing = [name for name in signals if name not in reference]
    if missing:
        raise ValueError(f"no reference mean and spread for signal {missing[0]!r}")
    return combine([standardise(s, *reference[name]) for name, s in signals.items()], rule)

"""Combined selection scores: several signals (CLUES, perplexity, IFD) on one scale.

Each signal is standardised against the public anchors' scores, z = (s − mean_anchor) /
std_anchor: the anchors are clean and public, so every site and the server put the same
signal on the same scale, and one global τ on the combined score still means the same
thing at every site. Signals fail on different pollution kinds (CLUES's preconditioned
direction forgets how large a gradient was, so long junk can pass it; a loss keeps that
magnitude), so a record's combined score is their sum (``sum``: a weak signal is outvoted)
or their minimum (``min``: a record must look clean to every signal).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

RULES = ("sum", "min")


SPREAD_FLOOR = 1e-9  # relative to the reference scores' magnitude: below it their spread is rounding noise


def standardise(scores: torch.Tensor, anchor_scores: torch.Tensor) -> torch.Tensor:
    """``scores`` in units of the anchors' spread around their mean (float64). A spread below
    ``SPREAD_FLOOR`` × the anchors' largest magnitude is refused: the reference cannot tell
    records apart, and dividing by its rounding noise would let this one signal decide any
    combination alone (z ≈ ±1000 for anchors agreeing to 1e-14)."""
    anchors = torch.as_tensor(anchor_scores, dtype=torch.float64)
    if anchors.numel() < 2:
        raise ValueError("standardising against the anchors needs at least 2 anchor scores")
    spread, scale = float(anchors.std()), float(anchors.abs().max())
    if not spread > SPREAD_FLOOR * scale:
        raise ValueError(
            f"the reference scores' spread {spread:.3g} is below {SPREAD_FLOOR:g} of their scale {scale:.3g}: "
            "they do not vary, so this signal cannot be standardised against them"
        )
    return (torch.as_tensor(scores, dtype=torch.float64) - anchors.mean()) / spread


def combine(standardised: Sequence[torch.Tensor], rule: str = "sum") -> torch.Tensor:
    """One score per record from the standardised signals."""
    if rule not in RULES:
        raise ValueError(f"combination rule must be one of {RULES}, got {rule!r}")
    stacked = torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in standardised])
    return stacked.sum(0) if rule == "sum" else stacked.min(0).values


def combined(signals: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], rule: str = RULES[0]):
    """The selection score of records scored by every signal in ``signals``: one signal as
    it is; several each standardised against its ``reference`` scores (the anchors') and
    combined by ``rule``. The server, every site and every driver score through this."""
    if len(signals) == 1:
        return torch.as_tensor(next(iter(signals.values())), dtype=torch.float64)
    standardised = []
    for name, scores in signals.items():
        try:
            standardised.append(standardise(scores, reference[name]))
        except ValueError as err:
            raise ValueError(f"signal {name!r}: {err}") from err
    return combine(standardised, rule)

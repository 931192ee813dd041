"""The server's clean reference: its model, the public validation set, the anchors and any
more clean records, scored by the server itself by every signal of a selection; and those
scores with the standard fixed from them, the server's side of one trajectory."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from clues_flwr.core.adapter import set_adapter_state
from clues_flwr.core.combine import references
from clues_flwr.core.data import Record
from clues_flwr.core.scoring import ScoreConfig, left_out_scores
from clues_flwr.core.scoring import scores as clues_scores
from clues_flwr.core.signals import datainf_direction, scores_by_signal
from clues_flwr.core.threshold import Standard
from clues_flwr.core.trajectory import Checkpoint


@dataclasses.dataclass(frozen=True)
class Reference:
    """What the server holds to score the public records itself: a PEFT model, its
    tokenizer, the public validation set (G_t, DataInf's direction), the anchors, and any
    more clean records a user adds (``clean``). All of them are the clean reference every
    signal is standardised against and every fallback τ is set from."""

    model: Any
    tokenizer: Any
    validation: list[Record]
    anchors: list[Record]
    clean: list[Record] = dataclasses.field(default_factory=list)

    @property
    def records(self) -> list[Record]:
        """The clean reference: validation, anchors, then the added records, in that order."""
        return [*self.validation, *self.anchors, *self.clean]

    @property
    def anchor_slice(self) -> slice:
        return slice(len(self.validation), len(self.validation) + len(self.anchors))

    def scored(
        self,
        signals: list[str],
        adapter: dict[str, torch.Tensor],
        trajectory: list[Checkpoint] | None,
        score: ScoreConfig,
        max_len: int,
        seed: int,
    ) -> tuple[list[torch.Tensor] | None, dict[str, torch.Tensor], torch.Tensor | None]:
        """G_t (CLUES only, else None), the reference's scores by each of ``signals`` and
        DataInf's direction (else None). CLUES scores along ``trajectory``, each validation
        record with itself left out of G_t; the other signals at ``adapter``, DataInf along
        the direction of the public validation set, which the sites are sent too."""
        out, val_sums, direction = {}, None, None
        others = [n for n in signals if n != "clues"]
        if others:
            if "datainf" in others:
                set_adapter_state(self.model, adapter)
                direction = datainf_direction(
                    self.model, self.tokenizer, self.validation, batch_size=score.batch_size, max_len=max_len
                )
            out.update(
                scores_by_signal(
                    others,
                    self.model,
                    self.tokenizer,
                    self.records,
                    score,
                    max_len,
                    adapter=adapter,
                    direction=direction,
                    seed=seed,
                )
            )
        if "clues" in signals:
            val_sums, own = left_out_scores(self.model, self.tokenizer, self.validation, trajectory, score, max_len)
            rest = [*self.anchors, *self.clean]
            out["clues"] = torch.cat(
                [own, clues_scores(self.model, self.tokenizer, rest, trajectory, val_sums, score, max_len)]
            )
        return val_sums, {n: out[n] for n in signals}, direction


@dataclasses.dataclass
class ReferenceScores:
    """The server's side of one trajectory (or of the initial adapter, for baselines): per
    signal the reference's scores and their (mean, spread), and the standard fixed from them."""

    trajectory: list[Checkpoint] | None
    val_sums: list[torch.Tensor] | None
    scores: dict[str, torch.Tensor]  # per signal, over the reference records
    direction: torch.Tensor | None
    standard: Standard

    @property
    def stats(self) -> dict[str, tuple[float, float]]:
        """Each signal's reference mean and spread: all a site is sent to standardise by."""
        return references(self.scores)

    def state(self) -> dict:
        """As the run state keeps it: what a resumed run needs not to score the reference again."""
        return {"reference-scores": {n: s.tolist() for n, s in self.scores.items()}, "standard": self.standard.row()}

    @classmethod
    def from_state(cls, state: dict, trajectory: list[Checkpoint], val_sums: list[torch.Tensor]) -> ReferenceScores:
        """What ``state`` wrote, on the saved trajectory."""
        scores = {n: torch.tensor(s, dtype=torch.float64) for n, s in state["reference-scores"].items()}
        return cls(trajectory, val_sums, scores, None, Standard.from_row(state["standard"]))

"""What a run needs to continue after a crash, kept in ``<run folder>/state/``.

After the score phase: the federated trajectory, its validation sums and the public side of
the selection (τ, anchor scores, histogram edges). After every tuning round: the global
adapter, the round, the metrics history and the report so far. Every file is written
under a temporary name and renamed into place, and ``state.json`` is renamed last and
names the adapter file it belongs to, so a crash at any moment leaves the previous
complete state readable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from clues_flwr import trajectory as traj
from clues_flwr.trajectory import Checkpoint

STATE = "state.json"


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class RunState:
    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / "state"

    def load(self) -> dict | None:
        """The last complete state, or None for a run that has not saved one yet."""
        path = self.folder / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): the run state is damaged") from err
        if state.get("adapter"):
            state["adapter"] = load_file(self.folder / state["adapter"])
        return state

    def save(self, state: dict, adapter: dict[str, torch.Tensor] | None = None) -> None:
        """``state`` (JSON-able) and, when given, the adapter it belongs to."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state = dict(state, adapter=None)
        if adapter is not None:
            name = f"adapter-round-{state['round']:05d}.safetensors"
            tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
            _replace(self.folder / name, lambda p: save_file(tensors, p))
            state["adapter"] = name
        _replace(self.folder / STATE, lambda p: p.write_text(json.dumps(state, indent=1) + "\n"))
        for old in self.folder.glob("adapter-round-*.safetensors"):
            if old.name != state["adapter"]:
                old.unlink()

    def save_trajectory(self, trajectory: list[Checkpoint], val_sums: list[torch.Tensor]) -> None:
        final = self.folder / "trajectory"
        staging = final.with_name("trajectory.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        for t, ckpt in enumerate(trajectory):
            traj.save(ckpt, staging / f"checkpoint-{t}")
        save_file(
            {f"checkpoint-{t}": g.contiguous().cpu() for t, g in enumerate(val_sums)},
            staging / "validation-sums.safetensors",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)

    def trajectory(self) -> tuple[list[Checkpoint], list[torch.Tensor]]:
        folder = self.folder / "trajectory"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: the saved state names a trajectory that is not there")
        sums = load_file(folder / "validation-sums.safetensors")
        count = len(sums)
        return [traj.load(folder / f"checkpoint-{t}") for t in range(count)], [
            sums[f"checkpoint-{t}"] for t in range(count)
        ]

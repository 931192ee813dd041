"""What a run needs to continue after a crash, kept in ``<run folder>/state/``, and the
per-round hook that saves it.

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
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from safetensors.torch import load_file, save_file

from clues_flwr import trajectory as traj
from clues_flwr.config import OutputConfig
from clues_flwr.log import say
from clues_flwr.report import open_run, resumable
from clues_flwr.timing import note, timing_enabled
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


# Keys a resumed run may change: how far to go, and where the run folder was looked up.
RESUME_FREE = ("num-server-rounds", "resume-from", "output-dir")
SERVER = "evaluate_metrics_serverapp"  # the central evaluation, named as in Flower's Result


@dataclass
class Start:
    """Where a run starts: a new run folder, or the one ``resume-from`` names with what it saved."""

    run_dir: Path
    store: RunState
    saved: dict | None

    @classmethod
    def open(cls, output: OutputConfig, config: dict, run_id: int) -> "Start":
        """``config`` (run config and base model) goes into a new run folder's ``config.json``,
        or must match the resumed one's up to ``RESUME_FREE``."""
        if output.resume_from:
            run_dir = resumable(Path(output.resume_from).expanduser().resolve(), config, RESUME_FREE)
        else:
            run_dir = open_run(Path(output.output_dir).expanduser().resolve(), run_id, config)
        store = RunState(run_dir)
        saved = store.load()
        if saved:
            say(f"resume: {run_dir} stands after tuning round {saved['round']}")
        return cls(run_dir, store, saved)

    @property
    def first_round(self) -> int:
        """The first tuning round still to run."""
        return self.saved["round"] + 1 if self.saved and self.saved.get("adapter") else 1

    def adapter(self, initial: ArrayRecord) -> ArrayRecord:
        return ArrayRecord(self.saved["adapter"]) if self.first_round > 1 else initial

    def history(self) -> dict[str, dict[int, MetricRecord]]:
        """The metrics of the saved rounds, per Flower ``Result`` name and round."""
        if self.first_round == 1:
            return {}
        return {name: {int(r): MetricRecord(m) for r, m in per.items()} for name, per in self.saved["history"].items()}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


class RoundHook:
    """Flower's per-round ``evaluate_fn`` for the tuning rounds: the central evaluation every
    ``evaluate-every`` rounds (and before the first and after the last), the run state every
    ``save-every`` rounds (and after the last), and one progress line per round.

    Parameters
    ----------
    start : Start
        The run folder and where a resumed run continues (Flower numbers its rounds from 1).
    evaluate : Callable[[int, ArrayRecord], MetricRecord]
        The central evaluation of the global adapter at a round.
    history : dict
        The tuning strategy's client-side metrics per round (read, for the train loss and
        the saved state).
    state : Callable[[], dict]
        What else a resume needs (the public side of the selection, the report), as JSON.
    last_round, evaluate_every, save_every : int
        The last tuning round, and how often to evaluate and save.
    """

    def __init__(self, start: Start, evaluate, history, state, last_round: int, evaluate_every=1, save_every=1):
        self.start, self.evaluate, self.history, self.state = start, evaluate, history, state
        self.last, self.evaluate_every, self.save_every = last_round, evaluate_every, save_every
        self.first = start.first_round
        self.server: dict[int, MetricRecord] = start.history().get(SERVER, {})
        self.seconds: list[float] = []
        self._clock = time.monotonic()

    def due(self, server_round: int, every: int) -> bool:
        return server_round == self.last or server_round % every == 0

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = flower_round + self.first - 1
        begun = time.time()
        metrics = None
        if flower_round == 0:
            if self.first == 1:  # a resumed run's starting adapter was evaluated before the stop
                metrics = self.server[0] = self.evaluate(0, arrays)
        elif self.due(server_round, self.evaluate_every):
            metrics = self.server[server_round] = self.evaluate(server_round, arrays)
        if flower_round > 0 and self.due(server_round, self.save_every):
            rows = {**self.history, SERVER: self.server}
            history = {name: {str(r): dict(m) for r, m in per.items()} for name, per in rows.items()}
            state = {"round": server_round, **self.state(), "history": history}
            self.start.store.save(state, arrays.to_torch_state_dict())
        now = time.monotonic()
        if flower_round > 0:
            self.seconds.append(now - self._clock)
            self.progress(server_round)
        self._clock = now
        if timing_enabled():
            note("server round hook", begun, time.time(), round=server_round, run_dir=folder_bytes(self.start.run_dir))
        return metrics

    def progress(self, server_round: int) -> None:
        """``round 7/300: train loss 1.2345, 3.1 s, ETA 15m 20s``: the ETA from the median
        round so far, which one slow round (a first-round warm-up) does not move."""
        loss = self.history.get("train_metrics_clientapp", {}).get(server_round, {}).get("train-loss")
        left = (self.last - server_round) * statistics.median(self.seconds)
        minutes, seconds = divmod(round(left), 60)
        eta = f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"
        loss_text = f"train loss {loss:.4f}" if loss is not None else "no aggregate"
        say(f"round {server_round}/{self.last}: {loss_text}, {self.seconds[-1]:.1f} s, ETA {eta}")

"""The run's one owner of state: its folder, what it saved (read once), its true rounds.

A run folder is named ``NAME.partial`` until the run completes, so a crash never leaves a
folder that looks finished; meanwhile ``state/`` lets ``resume-from`` continue it. After the
score phase it holds the federated trajectory, its validation sums G_t and the reference scores
of the selection (each signal's anchor scores, the standard); after every ``save-every``
tuning rounds the global adapter, the round, the history and the report so far. Every file
is written under a temporary name and renamed into place, and ``state.json`` is renamed
last and names the adapter file it belongs to, so a crash at any moment leaves the previous
complete state readable.

``Rounds`` is what the tuning wrapper and the per-round hook share: Flower numbers a resumed
run's rounds from 1, ``true`` turns them into the run's, ``due`` says when to evaluate or
save, and ``history`` holds every round's metrics once, by true round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from safetensors.torch import load_file, save_file

from clues_flwr.config import AppConfig, key_of, sections
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.demo.plots import plot_rounds, plot_selection
from clues_flwr.demo.timing import note, timing_enabled
from clues_flwr.flower.log import say
from clues_flwr.flower.reference import ReferenceScores
from clues_flwr.flower.report import SelectionReport

STATE = "state.json"
PARTIAL = ".partial"
# Keys a resumed run may change: how far to go, and where the run folder was looked up.
RESUME_FREE = ("num-server-rounds", "resume-from", "output-dir")
# The history's parts: the sites' training and evaluation (as ``CluesTuning`` names them) and the server's.
TRAIN, EVALUATE, SERVER = "train", "evaluate", "server"


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(ckpt: Checkpoint, folder: Path) -> None:
    """A checkpoint as safetensors (adapter, moments) and JSON (the rest)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ckpt.adapter.items()}, folder / "adapter.safetensors")
    tensors = {f"exp_avg/{k}": v for k, v in ckpt.exp_avg.items()}
    tensors.update({f"exp_avg_sq/{k}": v for k, v in ckpt.exp_avg_sq.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "moments.safetensors")
    info = {
        "step": ckpt.step,
        "lr": ckpt.lr,
        "weight_decay": ckpt.weight_decay,
        "round": ckpt.round,
        "betas": list(ckpt.betas),
        "eps": ckpt.eps,
        "meta": ckpt.meta,
    }
    (folder / "checkpoint.json").write_text(json.dumps(info, indent=2) + "\n")


def load_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint ``save_checkpoint`` wrote; a missing file is named."""
    missing = [
        f for f in ("adapter.safetensors", "moments.safetensors", "checkpoint.json") if not (folder / f).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint folder {folder} lacks {', '.join(missing)}")
    info = json.loads((folder / "checkpoint.json").read_text())
    tensors = load_file(folder / "moments.safetensors")
    return Checkpoint(
        adapter=load_file(folder / "adapter.safetensors"),
        exp_avg={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg/")},
        exp_avg_sq={k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("exp_avg_sq/")},
        step=int(info["step"]),
        lr=float(info["lr"]),
        weight_decay=float(info["weight_decay"]),
        round=int(info["round"]),
        betas=tuple(info["betas"]),
        eps=float(info["eps"]),
        meta=info.get("meta", {}),
    )


@dataclass
class Saved:
    """A run folder's last complete state.

    Parameters
    ----------
    round : int
        The last tuning round saved (0: saved after the score phase, before any tuning).
    adapter : dict or None
        The global adapter after ``round`` (None before the first tuning round).
    reference : dict or None
        The selection's reference scores by signal and the standard (``ReferenceScores.state``).
    report : dict
        The selection report so far (``SelectionReport.to_state``).
    history : dict
        Every saved round's metrics, by part and true round.
    """

    round: int
    adapter: dict[str, torch.Tensor] | None
    reference: dict | None
    report: dict
    history: dict[str, dict[int, dict]]


@dataclass
class Rounds:
    """The tuning rounds' true numbers, the one ``due`` rule and the history by true round.

    Parameters
    ----------
    first : int
        The first tuning round still to run (after a resume, the one after the last saved).
    last : int or None
        The last tuning round (None: whatever Flower's loop runs, every round due).
    evaluate_every, save_every : int
        Evaluate (centrally and on the sites) and save every this many rounds, and after the last.
    """

    first: int
    last: int | None
    evaluate_every: int
    save_every: int
    history: dict[str, dict[int, MetricRecord]] = field(default_factory=lambda: {TRAIN: {}, EVALUATE: {}, SERVER: {}})

    def true(self, flower_round: int) -> int:
        return flower_round + self.first - 1

    def due(self, true_round: int, every: int) -> bool:
        return true_round == self.last or true_round % every == 0

    def record(self, part: str, true_round: int, metrics: MetricRecord | None) -> None:
        if metrics is not None:
            self.history[part][true_round] = metrics

    def table(self) -> list[dict]:
        """One row per round (0 = before training), client and server metrics joined."""
        rows: dict[int, dict] = {}
        for part in self.history.values():
            for rnd, record in part.items():
                rows.setdefault(rnd, {"round": rnd}).update({k: v for k, v in record.items() if k != "num-examples"})
        return [rows[r] for r in sorted(rows)]


class RunFolder:
    """A run folder, new or resumed, and what it saved.

    Parameters
    ----------
    path : Path
        The folder.
    saved : Saved or None
        Its last complete state, read once when it was opened (None for a new run).
    """

    def __init__(self, path: Path, saved: Saved | None):
        self.path, self.saved = path, saved
        self.state = path / "state"

    @classmethod
    def open(cls, cfg: AppConfig, run_config: dict, base_model: str, run_id: int) -> "RunFolder":
        """The folder ``resume-from`` names, whose config must equal this one up to
        ``RESUME_FREE``; else the one unfinished run in ``output-dir`` with this config and a
        saved state (rerunning a crashed run's command resumes it); else a new folder
        holding ``config.json`` (the run config and base model)."""
        output = cfg.output
        out = Path(output.output_dir).expanduser().resolve()
        if output.resume_from:
            path = Path(output.resume_from).expanduser().resolve()
            problem = _resume_problem(path, cfg)
            if problem:
                raise ValueError(f"resume-from {path}: {problem}")
        elif resumable := [f for f in sorted(out.glob(f"*{PARTIAL}")) if not _resume_problem(f, cfg)]:
            path = resumable[-1]
            say(f"resume: {path} is this run stopped early, so it goes on from there (resume-from chooses another)")
        else:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"{time.strftime('%Y%m%d-%H%M%S')}-run{run_id}{PARTIAL}"
            path.mkdir()
            config = {"run_config": dict(run_config), "base_model": base_model}
            (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        folder = cls(path, _read(path / "state"))
        if folder.saved:
            say(f"resume: {path} stands after tuning round {folder.saved.round}")
        return folder

    def saved_state(self) -> Saved | None:
        """What ``state/`` holds now (``saved`` is what it held when the folder was opened)."""
        return _read(self.state)

    @property
    def first_round(self) -> int:
        """The first tuning round still to run."""
        return self.saved.round + 1 if self.saved and self.saved.adapter is not None else 1

    def rounds(self, cfg: AppConfig) -> Rounds:
        last = 1 if cfg.tune.mode == "merge" else cfg.tune.num_server_rounds
        rounds = Rounds(self.first_round, last, cfg.output.evaluate_every, cfg.output.save_every)
        if self.first_round > 1:
            for part, per in self.saved.history.items():
                rounds.history[part].update({int(r): MetricRecord(m) for r, m in per.items()})
        return rounds

    def save(
        self,
        round: int,
        reference: dict | None,
        report: dict,
        rounds: Rounds | None = None,
        adapter: dict | None = None,
    ) -> None:
        """The state after ``round`` and, when given, the adapter it belongs to."""
        self.state.mkdir(parents=True, exist_ok=True)
        parts = rounds.history if rounds else {}
        history = {part: {str(r): dict(m) for r, m in per.items()} for part, per in parts.items()}
        state = {"round": round, "reference": reference, "report": report, "history": history, "adapter": None}
        if adapter is not None:
            name = f"adapter-round-{round:05d}.safetensors"
            tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.items()}
            _replace(self.state / name, lambda p: save_file(tensors, p))
            state["adapter"] = name
        _replace(self.state / STATE, lambda p: p.write_text(json.dumps(state, indent=1) + "\n"))
        for old in self.state.glob("adapter-round-*.safetensors"):
            if old.name != state["adapter"]:
                old.unlink()

    def save_trajectory(self, trajectory: list[Checkpoint], val_sums: list[torch.Tensor]) -> None:
        final = self.state / "trajectory"
        staging = final.with_name("trajectory.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        for t, ckpt in enumerate(trajectory):
            save_checkpoint(ckpt, staging / f"checkpoint-{t}")
        save_file(
            {f"checkpoint-{t}": g.contiguous().cpu() for t, g in enumerate(val_sums)},
            staging / "validation-sums.safetensors",
        )
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)

    def keep_trace(self, scores: ReferenceScores, report: SelectionReport) -> None:
        """A federated trace, saved before the score phase so a crashed run resumes after it."""
        self.save_trajectory(scores.trajectory, scores.val_sums)
        self.save(0, scores.state(), report.to_state())

    def reference_scores(self) -> ReferenceScores | None:
        """The saved trace's reference scores on its trajectory, when this run saved one."""
        if self.saved is None or not self.saved.reference:
            return None
        return ReferenceScores.from_state(self.saved.reference, *self.trajectory())

    def trajectory(self) -> tuple[list[Checkpoint], list[torch.Tensor]]:
        """The saved trajectory and its validation sums G_t."""
        folder = self.state / "trajectory"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is missing: the saved state names a trajectory that is not there")
        sums = load_file(folder / "validation-sums.safetensors")
        count = len(sums)
        trajectory = [load_checkpoint(folder / f"checkpoint-{t}") for t in range(count)]
        return trajectory, [sums[f"checkpoint-{t}"] for t in range(count)]

    def finish(self, model, rounds: Rounds, report: dict) -> Path:
        """Write the final adapter, metrics, selection and plots, then drop ``.partial``."""
        model.save_pretrained(self.path / "adapter")
        table = rounds.table()
        metrics = {"rounds": table, "trace": report.get("trace", {}), "failures": report.get("failures", [])}
        (self.path / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if len(table) > 1:
            plot_rounds(table, self.path / "rounds.png")
        if report.get("selection"):
            (self.path / "selection.json").write_text(json.dumps(report["selection"], indent=2) + "\n")
            if report["selection"].get("clients"):
                plot_selection(report["selection"], self.path / "selection.png")
        if not self.path.name.endswith(PARTIAL):
            return self.path
        final = self.path.with_name(self.path.name[: -len(PARTIAL)])
        self.path.rename(final)
        self.path = final
        return final


def _read(folder: Path) -> Saved | None:
    path = folder / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the run state is damaged") from err
    adapter = load_file(folder / state["adapter"]) if state.get("adapter") else None
    history = {part: {int(r): m for r, m in per.items()} for part, per in state.get("history", {}).items()}
    return Saved(state["round"], adapter, state.get("reference"), state["report"], history)


def _resume_problem(folder: Path, cfg: AppConfig) -> str | None:
    """Why ``folder`` cannot be resumed with ``cfg`` (None when it can): no saved state, or a
    config that differs (as typed values, so ``0.5`` and ``0.50`` agree) in a key outside
    ``RESUME_FREE``."""
    if not (folder / "state" / STATE).is_file():
        return (
            "no saved state (state/state.json); not a run folder of this app, or the run stopped before its score phase"
        )
    try:
        saved = AppConfig.from_run_config(json.loads((folder / "config.json").read_text())["run_config"])
    except (OSError, ValueError, KeyError) as err:
        return f"its config.json cannot be read as this app's ({err})"
    changed = [
        key_of(f)
        for name in sections()
        for f in dataclasses.fields(getattr(cfg, name))
        if key_of(f) not in RESUME_FREE and getattr(getattr(cfg, name), f.name) != getattr(getattr(saved, name), f.name)
    ]
    if changed:
        return f"the run config differs in {', '.join(sorted(set(changed)))}; only {', '.join(RESUME_FREE)} may change"
    return None


class RoundHook:
    """Flower's per-round ``evaluate_fn`` for the tuning rounds: the central evaluation when
    due (and before the first round of a new run), the run state when due, and one progress
    line per round.

    Parameters
    ----------
    folder : RunFolder
        Where the state is saved.
    rounds : Rounds
        The true rounds, the ``due`` rule and the history the tuning wrapper fills.
    evaluate : Callable[[int, ArrayRecord], MetricRecord]
        The central evaluation of the global adapter at a true round.
    state : Callable[[], tuple[dict | None, dict]]
        What else a resume needs, as JSON: the selection's reference scores and the report.
    """

    def __init__(
        self,
        folder: RunFolder,
        rounds: Rounds,
        evaluate: Callable[[int, ArrayRecord], MetricRecord],
        state: Callable[[], tuple[dict | None, dict]],
    ):
        self.folder, self.rounds, self.evaluate, self.state = folder, rounds, evaluate, state
        self.seconds: list[float] = []
        self._clock = time.monotonic()

    def __call__(self, flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        begun = time.time()
        rounds = self.rounds
        true_round = rounds.true(flower_round)
        if flower_round == 0:  # a resumed run's starting adapter was evaluated before the stop
            due = rounds.first == 1
        else:
            due = rounds.due(true_round, rounds.evaluate_every)
        metrics = self.evaluate(0 if flower_round == 0 else true_round, arrays) if due else None
        rounds.record(SERVER, 0 if flower_round == 0 else true_round, metrics)
        if flower_round > 0 and rounds.due(true_round, rounds.save_every):
            reference, report = self.state()
            self.folder.save(true_round, reference, report, rounds, arrays.to_torch_state_dict())
        now = time.monotonic()
        if flower_round > 0:
            self.seconds.append(now - self._clock)
            self.progress(true_round)
        self._clock = now
        if timing_enabled():
            size = sum(f.stat().st_size for f in self.folder.path.rglob("*") if f.is_file())
            note("server round hook", begun, time.time(), round=true_round, run_dir=size)
        return metrics

    def progress(self, true_round: int) -> None:
        """``round 7/300: train loss 1.2345, 3.1 s, ETA 15m 20s``: the ETA from the median
        round so far, which one slow round (a first-round warm-up) does not move."""
        loss = self.rounds.history[TRAIN].get(true_round, {}).get("train-loss")
        left = (self.rounds.last - true_round) * statistics.median(self.seconds)
        minutes, seconds = divmod(round(left), 60)
        eta = f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"
        loss_text = f"train loss {loss:.4f}" if loss is not None else "no aggregate"
        say(f"round {true_round}/{self.rounds.last}: {loss_text}, {self.seconds[-1]:.1f} s, ETA {eta}")

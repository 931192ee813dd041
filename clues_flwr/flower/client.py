"""CLUES's client side, for any ClientApp: the trace rounds (``train.clues_trace``) and the
score phase (``query.clues_score``, then ``query.clues_threshold``) beside the project's own
``train`` and ``evaluate``; the project's training handler trains on ``selected_records``.

The scores and the keep mask stay on the node (``context.state``), tagged with the run and
with a fingerprint of the records they were computed on; only counts leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors import safe_open
from safetensors.torch import save_file

from clues_flwr.config import from_mapping
from clues_flwr.core.combine import combined
from clues_flwr.core.data import Record, prompt_format
from clues_flwr.core.metrics import confusion
from clues_flwr.core.privacy import SitePolicy, noisy_counts
from clues_flwr.core.scoring import ScoreConfig, scores, scoring_names
from clues_flwr.core.signals import signal_scores
from clues_flwr.core.threshold import histogram, keep, non_finite
from clues_flwr.core.train import TrainConfig, train_steps, training
from clues_flwr.core.trajectory import checkpoint, moments
from clues_flwr.flower.log import say
from clues_flwr.flower.messages import (
    DIRECTION_KEY,
    MOMENTS_KEY,
    SCORE_ACTION,
    SCORE_CONFIG_KEY,
    SELECTION_FLAG,
    THRESHOLD_ACTION,
    TRACE_ACTION,
    moments_record,
    trajectory_from,
    trajectory_records,
)
from clues_flwr.model import adapter_state, set_adapter_state

SELECTION_KEY = "clues-selection"  # the keep mask in context.state
SCORES_KEY = "clues-scores"  # the site's scores in context.state, between the score and threshold queries
LABEL_KEY = "site-label"  # node config: the name a site opts to be known by on the server
STATE_DIR_KEY = "state-dir"  # node config: a folder of the site's own where its keep mask survives a restart
RELEASED_KEY = "clues-released"  # what the score reply released (its noisy total under DP)
TAG_KEY = "clues-records"  # beside each: the run and the fingerprint of the records they cover
TRACE_SEED = 7919  # trace rounds shuffle apart from tuning rounds of the same number


@dataclass
class Site:
    """What CLUES needs of a site.

    Parameters
    ----------
    model : PeftModel
        The base model with LoRA on the scoring modules (``q_proj``/``v_proj`` by default).
    tokenizer : PreTrainedTokenizer
        Its tokenizer (a pad token is needed; the EOS token is used when there is none).
    records : list[Record]
        The records to select from, ``{"instruction", "input", "output"}`` or
        ``{"prompt", "output"}``; the same list, in the same order, in every phase.
    """

    model: Any
    tokenizer: Any
    records: list[Record]


def fingerprint(records: Sequence[Record]) -> str:
    """A digest of the records, in order: a keep mask is positional, so it must be applied
    to the very records it was computed on."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _tag(context: Context, key: str, run_id: int, digest: str) -> None:
    """Beside ``key`` in ``context.state``: the run and the records' fingerprint it covers."""
    context.state[f"{TAG_KEY}/{key}"] = ConfigRecord({"run-id": run_id, "records": digest})


def _selection_file(context: Context) -> Path | None:
    """Where this node keeps its keep mask on disk (``state-dir`` in its node config), one
    file per run: a SuperNode restarted mid-run has lost ``context.state``."""
    folder = str(context.node_config.get(STATE_DIR_KEY, ""))
    return Path(folder) / f"clues-selection-run{int(context.run_id)}.safetensors" if folder else None


def _keep_on_disk(context: Context, mask: torch.Tensor) -> None:
    path = _selection_file(context)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = context.state[f"{TAG_KEY}/{SELECTION_KEY}"]
    partial = path.with_suffix(".partial")
    save_file({SELECTION_KEY: mask}, partial, metadata={"run-id": str(tag["run-id"]), "records": tag["records"]})
    partial.replace(path)  # whole or absent, never half-written


def _restore(context: Context) -> None:
    """The keep mask from ``state-dir`` back into ``context.state``, when this run left one."""
    path = _selection_file(context)
    if path is None or not path.exists():
        return
    with safe_open(path, "pt") as f:
        tag, mask = f.metadata(), f.get_tensor(SELECTION_KEY)
    context.state[SELECTION_KEY] = ArrayRecord({SELECTION_KEY: mask})
    _tag(context, SELECTION_KEY, int(tag["run-id"]), tag["records"])


def _stored(context: Context, key: str, records: Sequence[Record], what: str) -> torch.Tensor:
    """The tensor ``key`` left on this node, if it was computed in this run on ``records``."""
    if key == SELECTION_KEY and key not in context.state:
        _restore(context)
    if key not in context.state:
        hint = "" if key != SELECTION_KEY or _selection_file(context) else f" (or restarted: set {STATE_DIR_KEY})"
        raise RuntimeError(f"no {what} on this node: it did not take part in the score phase{hint}")
    tag = context.state.get(f"{TAG_KEY}/{key}")
    if tag is None or int(tag["run-id"]) != int(context.run_id):
        raise RuntimeError(f"the {what} on this node is from another run: this run's score phase did not reach it")
    if tag["records"] != fingerprint(records):
        raise RuntimeError(
            f"the {what} on this node was computed on other records than the {len(records)} given: "
            "a site must hand the same records, in the same order, to every phase"
        )
    return context.state[key].to_torch_state_dict()[key]


def selected_records(records: list[Record], config: ConfigRecord, context: Context) -> list[Record]:
    """The records a tuning round trains on, for any project's own training handler.

    ``config`` is the round's train config; its ``clues-selection`` (set by ``CluesTuning``)
    says which selection: CLUES and the baselines keep the records that passed in this run's
    score phase (stored on this node, refused if computed on other records), ``oracle`` the
    clean ones by label (benchmarks only), ``none`` or no flag at all every record.
    """
    selection = str(config.get(SELECTION_FLAG, "none"))
    if selection == "none":
        return records
    if selection == "oracle":
        if any("quality" not in r for r in records):
            raise ValueError("selection 'oracle' needs a quality label on every record")
        return [r for r in records if r["quality"] == "high"]
    mask = _stored(context, SELECTION_KEY, records, f"{selection} selection").tolist()
    return [r for r, k in zip(records, mask) if k]


def training_loop(site: Site, records: list[Record], config: ConfigRecord, seed_offset: int = 0):
    """``training`` on ``records`` with the server's hyperparameters (a ``TrainConfig`` in
    ``config``); every round shuffles with its own seed, the trace apart by ``seed_offset``."""
    train = from_mapping(TrainConfig, config)
    seed = train.seed + 1009 * int(config["server-round"]) + seed_offset
    return training(
        site.model,
        site.tokenizer,
        records,
        train.batch_size,
        train.learning_rate,
        train.max_seq_len,
        seed,
        train.weight_decay,
    )


class CluesClient:
    """CLUES's handlers for a ClientApp, beside the project's own: the trace rounds
    (``train.clues_trace``) and the score phase (``query.clues_score``, then
    ``query.clues_threshold``). Tuning rounds stay with the project's own ``@app.train()``,
    which trains on ``selected_records``.

    The hyperparameters come in each message's config, so a project needs no run-config
    keys of its own. The scores and the selection stay on the node (``context.state``); only
    counts leave.

    Parameters
    ----------
    site : Callable[[Context], Site]
        The site's PEFT model, tokenizer and records for a message's context; called by
        every handler, so build them once per process (as the demo's ``task.site`` does).

    name : Callable[[Context], str], optional
        How the site's own console names it (the name never leaves the site).
    """

    def __init__(self, site: Callable[[Context], Site], name: Callable[[Context], str] = lambda context: "(unnamed)"):
        self.site, self.name = site, name

    def register(self, app: ClientApp) -> None:
        app.train(TRACE_ACTION)(self.trace)
        app.query(SCORE_ACTION)(self.score)
        app.query(THRESHOLD_ACTION)(self.threshold)

    def trace(self, msg: Message, context: Context) -> Message:
        """A federated trace round, or (merge mode) a whole local trajectory."""
        cfg = msg.content["config"]
        site = self.site(context)
        set_adapter_state(site.model, msg.content["arrays"].to_torch_state_dict())
        score = from_mapping(ScoreConfig, cfg)
        names = scoring_names(site.model, score.layer, score.modules)
        if cfg["phase"] == "trace-local":
            return self._trace_local(msg, cfg, site, names)
        return self._trace(msg, cfg, site, names)

    def _trace(self, msg: Message, cfg: ConfigRecord, site: Site, names: list[str]) -> Message:
        """One federated trace round; the scoring layer's moments go back for averaging."""
        losses, opt = train_steps(
            training_loop(site, site.records, cfg, TRACE_SEED), from_mapping(TrainConfig, cfg).local_steps
        )
        m, v, step = moments(site.model, opt, names)
        metrics = {"train-loss": sum(losses) / len(losses), "num-examples": len(site.records), "adam-step": step}
        reply = train_reply(msg, site, metrics)
        reply.content[MOMENTS_KEY] = moments_record(m, v)
        return reply

    def _trace_local(self, msg: Message, cfg: ConfigRecord, site: Site, names: list[str]) -> Message:
        """Merge mode: one local training run of ``trace-rounds`` × ``local-steps`` steps with
        one optimizer and one data order, checkpointed every ``local-steps`` steps."""
        every = from_mapping(TrainConfig, cfg).local_steps
        total = int(cfg["trace-rounds"]) * every
        loop = training_loop(site, site.records, cfg, TRACE_SEED)
        trajectory, losses = [], []
        for step, (loss, opt) in enumerate(islice(loop, total), start=1):
            losses.append(loss)
            if step % every == 0:
                trajectory.append(checkpoint(site.model, opt, names, adapter_state(site.model), round=step // every))
        metrics = {
            "train-loss": sum(losses) / len(losses),
            "num-examples": len(site.records),
            "adam-step": trajectory[-1].step,
        }
        reply = train_reply(msg, site, metrics)
        for key, record in trajectory_records(trajectory).items():
            reply.content[key] = record
        return reply

    def score(self, msg: Message, context: Context) -> Message:
        """Score every record; the scores stay on the node, only a histogram of them leaves
        (over the server's edges), from which the server may set τ."""
        begun = time.monotonic()
        content = msg.content
        cfg = content["config"]
        policy = from_mapping(SitePolicy, context.node_config)
        edges = list(cfg["histogram-edges"])
        refused = policy.edges_problem(edges)
        if refused:
            raise PermissionError(f"score query refused by this site's policy: {refused}")
        site = self.site(context)
        mine, theirs = prompt_format(site.records), str(cfg.get("prompt-format", "template"))
        mismatch = mine != theirs
        signals = str(cfg["method"]).split("+")
        reference = {n: tuple(cfg[f"reference-{n}"]) for n in signals if len(signals) > 1}
        s = combined(self._signals(signals, content, site, context), reference, str(cfg["combination"]))
        counts = [*histogram(s.tolist(), edges), non_finite(s)] if edges else [non_finite(s)]
        if policy.dp_epsilon:  # half the budget: the histogram and the non-finite cell are one query
            counts = noisy_counts(counts, policy.dp_epsilon / 2, _unseen())
        total = sum(counts) if policy.dp_epsilon else len(s)
        context.state[SCORES_KEY] = ArrayRecord({SCORES_KEY: s.double().contiguous()})
        context.state[RELEASED_KEY] = ConfigRecord({"total": total})
        _tag(context, SCORES_KEY, int(context.run_id), fingerprint(site.records))
        metrics = {
            "total": total,
            "histogram": counts[:-1],
            "non-finite": counts[-1],
            "dp-epsilon": policy.dp_epsilon,
            "prompt-mismatch": int(mismatch),
            "seconds": time.monotonic() - begun,
        }
        if mismatch:
            say(
                f"site {self.name(context)}: warning: its records' prompts ({mine}) differ from the server's ({theirs})"
            )
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if context.node_config.get(LABEL_KEY):  # opt-in: how the server's lines and report name this site
            content[LABEL_KEY] = ConfigRecord({LABEL_KEY: str(context.node_config[LABEL_KEY])})
        return Message(content=content, reply_to=msg)

    def threshold(self, msg: Message, context: Context) -> Message:
        """Keep S(z) ≥ τ (or the top ``keep-ratio``) of the scores the score query left on the
        node; reply with counts."""
        cfg = msg.content["config"]
        site = self.site(context)
        if SCORES_KEY not in context.state and SELECTION_KEY in context.state:
            raise PermissionError(
                "threshold query refused by this site's policy: one threshold per scoring, and this "
                "scoring's threshold was applied already (a second τ would reveal more of the scores)"
            )
        s = _stored(context, SCORES_KEY, site.records, "scores")
        policy = from_mapping(SitePolicy, context.node_config)
        tau = cfg.get("threshold")
        mask = keep(s, None if tau is None else float(tau), float(cfg["keep-ratio"]))
        context.state[SELECTION_KEY] = ArrayRecord({SELECTION_KEY: mask.to(torch.int8)})
        _tag(context, SELECTION_KEY, int(context.run_id), fingerprint(site.records))
        _keep_on_disk(context, mask.to(torch.int8))
        total = int(context.state[RELEASED_KEY]["total"])
        for key in (SCORES_KEY, f"{TAG_KEY}/{SCORES_KEY}", RELEASED_KEY):
            del context.state[key]  # applied once: the scores go, only the mask stays
        kept = mask.tolist()
        metrics = {"kept": sum(kept), "total": total}
        if policy.dp_epsilon:  # the other half of the budget; no confusion counts under DP
            metrics["kept"] = min(noisy_counts([sum(kept)], policy.dp_epsilon / 2, _unseen())[0], total)
            say(f"site {self.name(context)}: ε = {policy.dp_epsilon:g} spent on the score phase (geometric mechanism)")
        elif site.records and all("quality" in r for r in site.records):
            metrics.update(confusion(kept, [r["quality"] == "high" for r in site.records]))
        say(f"site {self.name(context)} (node {context.node_id}): kept {metrics['kept']}/{metrics['total']}")
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @staticmethod
    def _signals(names: list[str], content: RecordDict, site: Site, context: Context) -> dict[str, torch.Tensor]:
        """Each signal's scores of every record: CLUES along the trajectory, the others at
        the adapter the message carries (the loss signals from one forward pass)."""
        cfg = content["config"]
        out = {}
        if "clues" in names:
            trajectory, val_sums = trajectory_from(content)
            score = from_mapping(ScoreConfig, content[SCORE_CONFIG_KEY])
            out["clues"] = scores(site.model, site.tokenizer, site.records, trajectory, val_sums, score)
        others = [n for n in names if n != "clues"]
        if others:
            set_adapter_state(site.model, content["arrays"].to_torch_state_dict())
            direction = content[DIRECTION_KEY].to_torch_state_dict()["u"] if DIRECTION_KEY in content else None
            out.update(
                signal_scores(
                    others,
                    site.model,
                    site.tokenizer,
                    site.records,
                    batch_size=int(cfg["batch-size"]),
                    max_len=int(cfg["max-seq-len"]),
                    seed=int(cfg["seed"]) + context.node_id,
                    direction=direction,
                )
            )
        return {n: out[n] for n in names}


def _unseen() -> torch.Generator:
    """A generator the server cannot predict: DP noise must not be reproducible from outside."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


def train_reply(msg: Message, site: Site, metrics: dict) -> Message:
    """A train reply: the site's adapter and ``metrics``."""
    content = RecordDict({"arrays": ArrayRecord(adapter_state(site.model)), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)

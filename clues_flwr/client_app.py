"""ClientApp: the client side of CLUES on a site's own records.

``CluesClient`` adds CLUES's handlers (trace rounds on ``train.clues_trace``, the score
phase on ``query.clues_score``) to any ClientApp, beside the project's own ``train`` and
``evaluate``; a project's training handler trains on ``selected_records``. This app does
that for the demo and for site files: its own ``train`` tunes, its ``evaluate`` measures the
held-out loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clues_flwr.baselines import baseline_scores, keep_top
from clues_flwr.combine import combine, standardise
from clues_flwr.config import DataConfig, from_mapping
from clues_flwr.data import Record, split_heldout
from clues_flwr.log import say
from clues_flwr.messages import (
    CLEAN_EXAMPLES_KEY,
    CLEAN_LOSS_KEY,
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
from clues_flwr.metrics import confusion, eval_loss, histogram
from clues_flwr.model import ModelSpec, adapter_state, cached, set_adapter_state
from clues_flwr.partition import splits_for
from clues_flwr.scoring import ScoreConfig, scores, scoring_names
from clues_flwr.sources import load_records, parse_mapping
from clues_flwr.threads import threads_mod
from clues_flwr.timing import timing_mod
from clues_flwr.train import TrainConfig, train_steps, training
from clues_flwr.trajectory import checkpoint, moments

SELECTION_KEY = "clues-selection"  # the keep mask in context.state
SCORES_KEY = "clues-scores"  # the site's scores in context.state, between the score and threshold queries
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


def selected_records(records: list[Record], config: ConfigRecord, context: Context) -> list[Record]:
    """The records a tuning round trains on, for any project's own training handler.

    ``config`` is the round's train config; its ``clues-selection`` (set by the CLUES
    strategy) says which selection: CLUES and the baselines keep the records that passed in
    the score phase (stored on this node), ``oracle`` the clean ones by label (benchmarks
    only), ``none`` or no flag at all every record.
    """
    selection = str(config.get(SELECTION_FLAG, "none"))
    if selection == "none":
        return records
    if selection == "oracle":
        if any("quality" not in r for r in records):
            raise ValueError("selection 'oracle' needs a quality label on every record")
        return [r for r in records if r["quality"] == "high"]
    if SELECTION_KEY not in context.state:
        raise RuntimeError(f"no {selection} selection on this node: it did not take part in the score phase")
    keep = context.state[SELECTION_KEY]["keep"].numpy()
    if len(keep) != len(records):
        raise RuntimeError(f"the stored selection covers {len(keep)} records but the site now has {len(records)}")
    return [r for r, k in zip(records, keep) if k]


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
        every handler, so cache the model (as ``clues_flwr.model.cached`` does).
    """

    def __init__(self, site: Callable[[Context], Site]):
        self.site = site

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
        reply = _reply(msg, site, metrics)
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
        reply = _reply(msg, site, metrics)
        for key, record in trajectory_records(trajectory).items():
            reply.content[key] = record
        return reply

    def score(self, msg: Message, context: Context) -> Message:
        """Score every record; the scores stay on the node, only a histogram of them leaves
        (over the server's edges), from which the server may set τ."""
        begun = time.monotonic()
        content = msg.content
        cfg = content["config"]
        site = self.site(context)
        signals = str(cfg["method"]).split("+")
        per_signal = [self._signal(name, content, site, context) for name in signals]
        if len(signals) > 1:  # each on the anchors' scale, as the server put the anchors
            s = combine([standardise(x, list(cfg[f"anchor-scores-{n}"])) for n, x in zip(signals, per_signal)])
        else:
            (s,) = per_signal
        context.state[SCORES_KEY] = ArrayRecord({"scores": s.double().contiguous()})
        metrics = {
            "total": len(s),
            "histogram": histogram(s.tolist(), list(cfg["histogram-edges"])),
            "seconds": time.monotonic() - begun,
        }
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    def threshold(self, msg: Message, context: Context) -> Message:
        """Keep S(z) ≥ τ (or the top ``keep-ratio``) of the scores the score query left on the
        node; reply with counts."""
        cfg = msg.content["config"]
        site = self.site(context)
        if SCORES_KEY not in context.state:
            raise RuntimeError("no scores on this node: it did not answer the score query")
        s = context.state[SCORES_KEY]["scores"].numpy()
        if len(s) != len(site.records):
            raise RuntimeError(f"the stored scores cover {len(s)} records but the site now has {len(site.records)}")
        ratio = float(cfg["keep-ratio"])
        keep = (keep_top(s, ratio) if ratio else torch.from_numpy(s) >= float(cfg["threshold"])).tolist()
        context.state[SELECTION_KEY] = ArrayRecord({"keep": torch.tensor(keep, dtype=torch.int8)})
        metrics = {"kept": sum(keep), "total": len(keep)}
        if site.records and all("quality" in r for r in site.records):
            metrics.update(confusion(keep, [r["quality"] == "high" for r in site.records]))
        say(f"site {site_name(context)} (node {context.node_id}): kept {metrics['kept']}/{metrics['total']}")
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    @staticmethod
    def _signal(name: str, content: RecordDict, site: Site, context: Context) -> torch.Tensor:
        """One signal's scores of every record: CLUES along the trajectory, a baseline at the
        adapter the message carries."""
        cfg = content["config"]
        if name == "clues":
            trajectory, val_sums = trajectory_from(content)
            score = from_mapping(ScoreConfig, content[SCORE_CONFIG_KEY])
            return scores(site.model, site.tokenizer, site.records, trajectory, val_sums, score)
        set_adapter_state(site.model, content["arrays"].to_torch_state_dict())
        direction = content[DIRECTION_KEY].to_torch_state_dict()["u"] if DIRECTION_KEY in content else None
        return baseline_scores(
            name,
            site.model,
            site.tokenizer,
            site.records,
            batch_size=int(cfg["batch-size"]),
            max_len=int(cfg["max-seq-len"]),
            seed=int(cfg["seed"]) + context.node_id,
            direction=direction,
        )


def _reply(msg: Message, site: Site, metrics: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord(adapter_state(site.model)), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def site_name(context: Context) -> str:
    """How the site's own console names it: its ``data-path`` file's stem, or its partition."""
    node = context.node_config
    if node.get("data-path"):
        return Path(str(node["data-path"])).stem
    return f"partition {node['partition-id']}" if "partition-id" in node else "(unnamed)"


def site_records(context: Context) -> list[Record]:
    """The site's private records: its ``data-path`` (file, folder or hub dataset, read
    with the optional ``data-format``, ``data-mapping``, ``data-preset``, ``data-split``,
    ``data-subset``) when the node config names one, else (simulation) its partition of
    the run's ``dataset`` or of the demo, chosen by ``partition-id``."""
    node = context.node_config
    if node.get("data-path"):
        return load_records(
            str(node["data-path"]),
            format=str(node.get("data-format", "auto")),
            mapping=parse_mapping(str(node.get("data-mapping", ""))),
            preset=str(node.get("data-preset", "")) or None,
            split=str(node.get("data-split", "train")),
            subset=str(node.get("data-subset", "")) or None,
        )
    if "partition-id" not in node:
        raise ValueError(
            "node config has neither data-path nor partition-id: start the SuperNode with "
            "--node-config 'data-path=\"/path/to/site.jsonl\"'"
        )
    data = from_mapping(DataConfig, context.run_config)
    return splits_for(data, int(node["num-partitions"])).pools[int(node["partition-id"])]


def local_split(context: Context) -> tuple[list[Record], list[Record]]:
    """(train, held-out) of this site, the same in every round."""
    data = from_mapping(DataConfig, context.run_config)
    return split_heldout(site_records(context), data.heldout_fraction, data.seed)


def demo_site(context: Context) -> Site:
    model, tokenizer = cached(from_mapping(ModelSpec, context.run_config))
    return Site(model, tokenizer, local_split(context)[0])


app = ClientApp(mods=[threads_mod, timing_mod])
CluesClient(demo_site).register(app)


@app.train()
def tune(msg: Message, context: Context) -> Message:
    """The demo's own tuning round, as any project has one: train on the records the score
    phase kept. A site that kept nothing trains nothing and takes no weight."""
    cfg = msg.content["config"]
    site = demo_site(context)
    set_adapter_state(site.model, msg.content["arrays"].to_torch_state_dict())
    records = selected_records(site.records, cfg, context)
    loss = 0.0
    if records:
        hyper = from_mapping(TrainConfig, cfg)
        merge = cfg.get("mode") == "merge"  # one round of whole epochs, then a one-shot merge
        steps = math.ceil(hyper.local_epochs * len(records) / hyper.batch_size) if merge else hyper.local_steps
        losses, _ = train_steps(training_loop(site, records, cfg), steps)
        loss = sum(losses) / len(losses)
    return _reply(msg, site, {"train-loss": loss, "num-examples": len(records)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss on the site's held-out records, which are drawn from its polluted pool: it moves
    with pollution as well as with the model. When records carry quality labels the loss
    on the clean held-out records alone goes back too, with their count."""
    model, tokenizer = cached(from_mapping(ModelSpec, context.run_config))
    set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    _, heldout = local_split(context)
    train = from_mapping(TrainConfig, context.run_config)
    sizes = (train.batch_size, train.max_seq_len)
    metrics = {"heldout-loss": eval_loss(model, tokenizer, heldout, *sizes), "num-examples": len(heldout)}
    if heldout and all("quality" in r for r in heldout):
        clean = [r for r in heldout if r["quality"] == "high"]
        metrics[CLEAN_LOSS_KEY] = eval_loss(model, tokenizer, clean, *sizes) if clean else 0.0
        metrics[CLEAN_EXAMPLES_KEY] = len(clean)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

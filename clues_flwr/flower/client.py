"""CLUES's client side, for any ClientApp: the trace rounds (``train.clues_trace``) and the
score phase (``query.clues_score``, then ``query.clues_threshold``) beside the project's own
``train`` and ``evaluate``; the project's training handler trains on ``selected_records``.

Every request is decoded (``protocol``) and checked against the site's own policy and its
ledger of what it released before, before anything is computed. The scores and the keep mask
stay on the node (``context.state``), tagged with the run and with a fingerprint of the
records they were computed on; only counts leave.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors import safe_open
from safetensors.torch import save

from clues_flwr.config import from_mapping
from clues_flwr.core.adapter import adapter_state, set_adapter_state
from clues_flwr.core.combine import combined
from clues_flwr.core.data import Record, prompt_format
from clues_flwr.core.metrics import confusion
from clues_flwr.core.privacy import SitePolicy, noisy_counts, unseen
from clues_flwr.core.scoring import scoring_names
from clues_flwr.core.signals import scores_by_signal
from clues_flwr.core.threshold import histogram, keep, non_finite
from clues_flwr.core.train import TrainConfig, train_steps, training
from clues_flwr.core.trajectory import checkpoint, moments
from clues_flwr.flower import site_report
from clues_flwr.flower.adapter import adapter_arrays
from clues_flwr.flower.ledger import Ledger, site_file, write_atomic
from clues_flwr.flower.log import say
from clues_flwr.flower.protocol import (
    CLEAN_EXAMPLES_KEY,
    CLEAN_LOSS_KEY,
    HELDOUT_LOSS_KEY,
    LABEL_KEY,
    LABEL_LENGTH,
    SCORE_ACTION,
    THRESHOLD_ACTION,
    TRACE_ACTION,
    WEIGHT_KEY,
    Malformed,
    ScoreReply,
    ScoreRequest,
    ThresholdReply,
    ThresholdRequest,
    TraceReply,
    TraceRequest,
    selection_of,
)

SELECTION_KEY = "clues-keep-mask"  # the keep mask in context.state
SCORES_KEY = "clues-scores"  # each signal's and the combined scores, between the score and threshold queries
RELEASED_KEY = "clues-released"  # what this run's replies released: the noisy total and kept count under DP
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
    origins : list[int], optional
        Where each record sits in the site's data file (its line, from 1), and ``heldout``
        the lines set aside for evaluation: the site's own report (``state-dir``) names
        records by them. Default: records numbered in order.
    """

    model: Any
    tokenizer: Any
    records: list[Record]
    origins: list[int] | None = None
    heldout: Sequence[int] = ()


def simulated(context: Context) -> bool:
    """A simulated site (Flower's ``partition-id``, no ``data-path``): it holds the
    researcher's own split of one dataset, not a site's private records."""
    return "partition-id" in context.node_config and "data-path" not in context.node_config


def site_policy(context: Context) -> SitePolicy:
    """The site's own limits, from its node config. A simulated site's labels may be read
    unless its config says otherwise; any other site's labels stay unread by default."""
    node = dict(context.node_config)
    node.setdefault("allow-labels", simulated(context))
    return from_mapping(SitePolicy, node)


def site_label(context: Context) -> str | None:
    """The name a site gives itself and sends with its trace and score replies: its
    ``site-label`` (opt-in), a simulated site's ``partition N``, else none. One longer than the
    server accepts is refused here, by name, rather than making every reply malformed."""
    label = str(context.node_config.get(LABEL_KEY, ""))
    if len(label) > LABEL_LENGTH:
        raise ValueError(f"site-label {label[:20]!r}... has {len(label)} characters: at most {LABEL_LENGTH}")
    if not label and simulated(context):
        label = f"partition {context.node_config['partition-id']}"
    return label or None


def site_name(context: Context) -> str:
    """How a site is named in every line, its own console's and the server's alike: its
    label, else its node ID (which the server sees too)."""
    return site_label(context) or f"node {context.node_id}"


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


def _keep_on_disk(context: Context, mask: torch.Tensor, kept_sent: int) -> None:
    """The keep mask in ``state-dir`` (one file per node and run): a SuperNode restarted
    mid-run has lost ``context.state``."""
    path = site_file(context, "selection", ".safetensors")
    if path is None:
        return
    tag = context.state[f"{TAG_KEY}/{SELECTION_KEY}"]
    metadata = {"run-id": str(tag["run-id"]), "records": tag["records"], "kept-sent": str(kept_sent)}
    write_atomic(path, save({SELECTION_KEY: mask}, metadata=metadata))


def _restore(context: Context) -> None:
    """The keep mask from ``state-dir`` back into ``context.state``, when it is not in memory
    (a restarted SuperNode) and this run left one."""
    path = site_file(context, "selection", ".safetensors")
    if SELECTION_KEY in context.state or path is None or not path.exists():
        return
    with safe_open(path, "pt") as f:
        tag, mask = f.metadata(), f.get_tensor(SELECTION_KEY)
    context.state[SELECTION_KEY] = ArrayRecord({SELECTION_KEY: mask})
    context.state[RELEASED_KEY] = ConfigRecord({"kept": int(tag["kept-sent"])})
    _tag(context, SELECTION_KEY, int(tag["run-id"]), tag["records"])


def _stored(context: Context, key: str, digest: str, count: int, what: str) -> dict[str, torch.Tensor]:
    """The tensors ``key`` left on this node, if they were computed in this run on the
    ``count`` records whose fingerprint is ``digest``."""
    if key == SELECTION_KEY:
        _restore(context)
    if key not in context.state:
        restartable = key != SELECTION_KEY or site_file(context, "selection", "")
        hint = "" if restartable else " (or restarted: set state-dir)"
        raise RuntimeError(f"no {what} on this node: it did not take part in the score phase{hint}")
    tag = context.state.get(f"{TAG_KEY}/{key}")
    if tag is None or int(tag["run-id"]) != int(context.run_id):
        raise RuntimeError(f"the {what} on this node is from another run: this run's score phase did not reach it")
    if tag["records"] != digest:
        raise RuntimeError(
            f"the {what} on this node was computed on other records than the {count} given: "
            "a site must hand the same records, in the same order, to every phase"
        )
    return context.state[key].to_torch_state_dict()


def selected_records(records: list[Record], config: ConfigRecord, context: Context) -> list[Record]:
    """The records a tuning round trains on, for any project's own training handler.

    ``config`` is the round's train config; its ``clues-selection`` (set by ``CluesTuning``)
    says which selection: CLUES and the baselines keep the records that passed in this run's
    score phase (stored on this node, refused if computed on other records), ``oracle`` the
    clean ones by label (only where the site's ``allow-labels`` lets labels be read), ``none``
    or no flag at all every record.
    """
    selection = selection_of(config)
    if selection == "none":
        return records
    if selection == "oracle":
        if not site_policy(context).allow_labels:
            raise PermissionError("selection 'oracle' refused by this site's policy: its allow-labels is false")
        if any("quality" not in r for r in records):
            raise ValueError("selection 'oracle' needs a quality label on every record")
        return [r for r in records if r["quality"] == "high"]
    stored = _stored(context, SELECTION_KEY, fingerprint(records), len(records), f"{selection} selection")
    mask = stored[SELECTION_KEY].tolist()
    return [r for r, k in zip(records, mask) if k]


def round_seed(train: TrainConfig, server_round: int) -> int:
    """Every round shuffles with a seed of its own, derived from the run's."""
    return train.seed + 1009 * server_round


def training_loop(site: Site, records: list[Record], config: ConfigRecord):
    """``training`` on ``records`` with the server's hyperparameters (a ``TrainConfig`` in
    ``config``) and the round's own seed."""
    train = from_mapping(TrainConfig, config)
    return training(site.model, site.tokenizer, records, train, round_seed(train, int(config["server-round"])))


def train_reply(msg: Message, context: Context, model, metrics: dict) -> Message:
    """A tuning round's reply: ``model``'s adapter and ``metrics``. Under the site's DP the
    weight ``num-examples`` is not the exact count of records trained on: it is the noisy
    kept count this run's threshold reply released already (post-processing), at least 1
    (a noisy 0 would drop a site that trained, and whether it trained is not released)."""
    metrics = dict(metrics)
    if site_policy(context).dp_epsilon:
        _restore(context)
        released = context.state.get(RELEASED_KEY, ConfigRecord())
        metrics[WEIGHT_KEY] = max(int(released.get("kept", 1)), 1)
    content = RecordDict({"arrays": adapter_arrays(model), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def evaluate_reply(msg: Message, context: Context, heldout: list[Record], loss: Callable[[list[Record]], float]):
    """An evaluate reply under the site's policy: the held-out ``loss`` and count, none below
    its ``min-heldout`` (one record's loss is that record's); under DP a weight of 1; the
    clean records' loss and count only where labels may be read."""
    policy = site_policy(context)
    sent = len(heldout) >= policy.min_heldout
    labelled = policy.labels and sent and all("quality" in r for r in heldout)
    clean = [r for r in heldout if labelled and r["quality"] == "high"]
    metrics = {  # the same keys from every site, whatever it sends
        HELDOUT_LOSS_KEY: loss(heldout) if sent else 0.0,
        WEIGHT_KEY: (1 if policy.dp_epsilon else len(heldout)) if sent else 0,
        CLEAN_LOSS_KEY: loss(clean) if clean else 0.0,
        CLEAN_EXAMPLES_KEY: len(clean),
    }
    if not sent:
        say(
            f"evaluate: {len(heldout)} held-out record(s), below this site's min-heldout "
            f"{policy.min_heldout}: no loss sent"
        )
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


class CluesClient:
    """CLUES's handlers for a ClientApp, beside the project's own: the trace rounds
    (``train.clues_trace``) and the score phase (``query.clues_score``, then
    ``query.clues_threshold``). Tuning rounds stay with the project's own ``@app.train()``,
    which trains on ``selected_records`` and replies with ``train_reply``.

    The hyperparameters come in each message, so a project needs no run-config keys of its
    own. The scores and the selection stay on the node (``context.state``); only counts
    leave, within the site's policy (its node config) and ledger.

    Parameters
    ----------
    site : Callable[[Context], Site]
        The site's PEFT model, tokenizer and records for a message's context; called by
        every handler, so build them once per process (as the demo's ``task.site`` does).
    """

    def __init__(self, site: Callable[[Context], Site]):
        self.site = site

    def register(self, app: ClientApp) -> None:
        app.train(TRACE_ACTION)(self.trace)
        app.query(SCORE_ACTION)(self.score)
        app.query(THRESHOLD_ACTION)(self.threshold)

    def trace(self, msg: Message, context: Context) -> Message:
        """A federated trace round, or (merge mode) a whole local trajectory. Under DP the
        FedAvg weight is 1: the record count is not released."""
        request = _decoded(TraceRequest, msg, "trace")
        site = self.site(context)
        set_adapter_state(site.model, request.adapter)
        names = scoring_names(site.model, request.score)
        weight = 1 if site_policy(context).dp_epsilon else len(site.records)
        seed = round_seed(request.train, request.server_round) + TRACE_SEED
        loop = training(site.model, site.tokenizer, site.records, request.train, seed)
        every = request.train.local_steps
        if request.phase == "trace":
            losses, opt = train_steps(loop, every)
            m, v, step = moments(site.model, opt, names)
            loss = sum(losses) / len(losses)
            reply = TraceReply(adapter_state(site.model), loss, weight, step, moments=(m, v), label=site_label(context))
            return Message(content=reply.encode(), reply_to=msg)
        trajectory, losses = [], []  # merge mode: one optimizer, one data order, a checkpoint every local-steps
        for step, (loss, opt) in enumerate(islice(loop, request.trace_rounds * every), start=1):
            losses.append(loss)
            if step % every == 0:
                trajectory.append(checkpoint(site.model, opt, names, adapter_state(site.model), round=step // every))
        loss, step = sum(losses) / len(losses), trajectory[-1].step
        reply = TraceReply(
            adapter_state(site.model), loss, weight, step, trajectory=trajectory, label=site_label(context)
        )
        return Message(content=reply.encode(), reply_to=msg)

    def score(self, msg: Message, context: Context) -> Message:
        """Score every record; the scores stay on the node, only a histogram of them leaves
        (over the server's edges), from which the server may set τ. Refused past the site's
        policy: too many bins, a second scoring this run, ``max-scorings`` runs, the ε budget."""
        begun = time.monotonic()
        policy = site_policy(context)
        request = _decoded(ScoreRequest, msg, "score")
        refused = policy.edges_problem(request.edges)
        if refused:
            raise PermissionError(f"score query refused by this site's policy: {refused}")
        site = self.site(context)
        digest, run = fingerprint(site.records), int(context.run_id)
        ledger = Ledger.of(context)
        ledger.may_score(digest, run, policy)
        mine = prompt_format(site.records)
        mismatch = mine != request.prompt_format
        signals = self._signals(request, site, context)
        s = combined(signals, request.references, request.combination)
        bad = non_finite(s)
        exact = [*histogram(s.tolist(), request.edges), bad] if request.edges else [len(s) - bad, bad]
        counts = noisy_counts(exact, policy.dp_epsilon / 2, unseen()) if policy.dp_epsilon else exact
        ledger.release(context, digest, "score", policy.dp_epsilon / 2, max(len(request.edges) - 1, 0))
        context.state[SCORES_KEY] = ArrayRecord(
            {
                SCORES_KEY: s.double().contiguous(),
                **{f"signal/{n}": v.double().contiguous() for n, v in signals.items()},
            }
        )
        context.state[RELEASED_KEY] = ConfigRecord({"total": sum(counts)})
        _tag(context, SCORES_KEY, run, digest)
        reply = ScoreReply(
            total=sum(counts),
            histogram=counts[:-1] if request.edges else [],
            non_finite=counts[-1],
            dp_epsilon=policy.dp_epsilon,
            prompt_mismatch=mismatch,
            seconds=None if policy.dp_epsilon else time.monotonic() - begun,
            label=site_label(context),
        )
        if mismatch:
            say(
                f"{site_name(context)}: warning: its records' prompts ({mine}) differ from the server's "
                f"({request.prompt_format})"
            )
        return Message(content=reply.encode(), reply_to=msg)

    def threshold(self, msg: Message, context: Context) -> Message:
        """Keep S(z) ≥ τ (or the top ``keep-ratio``) of the scores this run's score query left
        on the node; reply with counts, and write the site's own report (``state-dir``)."""
        request = _decoded(ThresholdRequest, msg, "threshold")
        site = self.site(context)
        policy = site_policy(context)
        digest = fingerprint(site.records)
        ledger = Ledger.of(context)
        ledger.may_threshold(digest, int(context.run_id))
        stored = _stored(context, SCORES_KEY, digest, len(site.records), "scores")
        s = stored[SCORES_KEY]
        signals = {k.removeprefix("signal/"): v for k, v in stored.items() if k.startswith("signal/")}
        mask = keep(s, request.threshold, request.keep_ratio)
        kept, total = int(mask.sum()), int(context.state[RELEASED_KEY]["total"])
        sent = min(noisy_counts([kept], policy.dp_epsilon / 2, unseen())[0], total) if policy.dp_epsilon else kept
        ledger.release(context, digest, "threshold", policy.dp_epsilon / 2)
        bits = mask.to(torch.int8)
        context.state[SELECTION_KEY] = ArrayRecord({SELECTION_KEY: bits})
        _tag(context, SELECTION_KEY, int(context.run_id), digest)
        _keep_on_disk(context, bits, sent)
        for key in (SCORES_KEY, f"{TAG_KEY}/{SCORES_KEY}"):
            del context.state[key]  # applied once: the scores go, only the mask stays
        context.state[RELEASED_KEY] = ConfigRecord({"total": total, "kept": sent})
        reply = ThresholdReply(sent, total)
        if policy.labels and site.records and all("quality" in r for r in site.records):
            reply.confusion = confusion(mask.tolist(), [r["quality"] == "high" for r in site.records])
        entry = ledger.entry(digest)
        what = f"kept {kept}/{len(site.records)}"
        if policy.dp_epsilon:
            what += f" (sent under DP: kept {sent} of {total}; ε = {entry['epsilon']:g} of {policy.dp_budget:g} spent)"
        say(f"{site_name(context)}: {what}")
        report = site_file(context, "report", ".json")
        if report is not None:
            sent_counts = {"kept": sent, "total": total}
            site_report.write(report, site, s, signals, mask, request, entry, sent_counts)
        return Message(content=reply.encode(), reply_to=msg)

    @staticmethod
    def _signals(request: ScoreRequest, site: Site, context: Context) -> dict[str, torch.Tensor]:
        """Each signal's scores of every record: CLUES along the trajectory, the others at
        the adapter the request carries."""
        return scores_by_signal(
            request.signals,
            site.model,
            site.tokenizer,
            site.records,
            request.score,
            request.max_len,
            adapter=request.adapter,
            trajectory=request.trajectory or (),
            val_sums=request.val_sums or (),
            direction=request.direction,
            seed=request.seed + context.node_id,
        )


def _decoded(cls, msg: Message, what: str):
    """A request decoded, or one error naming what is wrong with it (before any work)."""
    try:
        return cls.decode(msg.content)
    except Malformed as err:
        raise ValueError(f"{what} query refused: malformed request: {err}") from err

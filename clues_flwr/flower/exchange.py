"""Which replies a phase can use, and a record of every one it cannot.

A reply is usable when it carries no error, its metrics and, where an adapter is expected,
a finite adapter with the reference adapter's keys and shapes. Every rejection, and every
node that was sent a message and did not answer before the round's timeout, is logged and
kept in ``failures``, which the run folder reports. ``exchange`` is one query phase (send,
screen, enough replies?); the strategies screen the replies Flower's loop hands them with
``usable`` and the messages they sent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from clues_flwr.core.aggregation import check_state
from clues_flwr.flower.log import say

# A phase's own check of a reply's content: why it cannot be used, or None.
Check = Callable[[int, RecordDict], str | None]


class Failures(list):
    """Every reply a phase could not use: ``{"where", "node", "reason"}`` rows, said as they
    come, each site by its name in ``names`` (``site 3``, or the label it chose)."""

    def __init__(self, rows=()):
        super().__init__(rows)
        self.names: dict[int, str] = {}

    def add(self, where: str, node: int | None, reason: str) -> None:
        who = "server" if node is None else self.names.get(node, f"node {node}")
        say(f"{where}: {who}: {reason}")
        self.append({"where": where, "node": node, "reason": reason})


def adapter_check(reference: dict, weighted_by_key: str) -> Check:
    """A reply must carry an adapter fit to aggregate with ``reference`` and its weight."""

    def check(node: int, content: RecordDict) -> str | None:
        if "arrays" not in content:
            return "reply without an adapter"
        problem = check_state(content["arrays"].to_torch_state_dict(), reference)
        if problem:
            return f"adapter rejected: {problem}"
        if weighted_by_key not in content["metrics"]:
            return f"reply without {weighted_by_key}"
        return None

    return check


def weighted(weighted_by_key: str) -> Check:
    """A reply must carry its weight, a finite number of at least 0."""

    def check(node: int, content: RecordDict) -> str | None:
        weight = content["metrics"].get(weighted_by_key)
        if not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
            return f"reply without a usable {weighted_by_key} ({weight!r})"
        return None

    return check


def usable(
    replies: Iterable[Message], sent: list[Message], where: str, failures: Failures, check: Check | None = None
) -> list[tuple[int, Message]]:
    """(node, reply) of every usable reply to ``sent``. A reply the SuperLink writes itself
    (node unavailable, message expired) comes from SUPERLINK_NODE_ID and names its node only
    by the message it replies to, whose ID the grid set as it pushed it."""
    destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    ok, answered = [], set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:
            node = destinations.get(msg.metadata.reply_to_message_id, node)
        answered.add(msg.metadata.reply_to_message_id)
        problem = _problem(node, msg, check)
        if problem:
            failures.add(where, node, problem)
        else:
            ok.append((node, msg))
    for message_id, node in destinations.items():
        if message_id not in answered:
            failures.add(where, node, "no reply before the round's timeout")
    return ok


def _problem(node: int, msg: Message, check: Check | None) -> str | None:
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    if "metrics" not in msg.content:
        return "reply without metrics"
    return check(node, msg.content) if check else None


def wait_for_nodes(grid: Grid, least: int, timeout: float, poll: float = 1.0) -> list[int]:
    """The connected nodes once at least ``least`` are, or one error within ``timeout``
    seconds naming the setting: Flower's own sampling would wait for ever."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= least:
            return nodes
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"only {len(nodes)} site(s) connected within round-timeout {timeout:g} s, "
                f"min-available-nodes is {least}: start more SuperNodes (or num-supernodes) or lower it"
            )
        time.sleep(poll)


def exchange(
    grid: Grid,
    messages: list[Message],
    where: str,
    failures: Failures,
    *,
    timeout: float,
    least: int,
    check: Check | None = None,
) -> dict[int, RecordDict]:
    """One query phase: send ``messages``, keep the usable replies' contents by node, and
    stop the stage when fewer than ``least`` remain."""
    replies = grid.send_and_receive(messages, timeout=timeout)
    contents = {node: msg.content for node, msg in usable(replies, messages, where, failures, check)}
    if len(contents) < least:
        raise RuntimeError(f"{where}: {len(contents)} site(s) replied usably, min-train-nodes is {least}")
    return contents

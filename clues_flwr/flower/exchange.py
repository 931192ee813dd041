"""Which replies a phase can use, and a record of every one it cannot.

A reply is usable when it carries no error and the phase's decoder (``protocol``) reads it:
whatever else it holds is that site's failure, never the run's end. Every rejection, and
every node that was sent a message and did not answer before the round's timeout, is logged
and kept in ``failures``, which the run folder reports. ``exchange`` is one query phase (send,
screen, enough replies?); the strategies screen the replies Flower's loop hands them with
``usable`` and the messages they sent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid

from clues_flwr.flower.log import say
from clues_flwr.flower.protocol import Malformed

# A phase's decoder of a reply's content: what it carries, checked, or ``Malformed``.
Decode = Callable[[int, RecordDict], Any]


class Failures(list):
    """Every reply a phase could not use: ``{"where", "node", "site", "reason"}`` rows, said
    as they come, each site by its name in ``names``: the label it sent (``client.site_label``),
    else ``node <id>``, as the site's own console names it."""

    def __init__(self, rows=()):
        super().__init__(rows)
        self.names: dict[int, str] = {}

    def learn(self, labels: dict[int, str | None]) -> None:
        """The labels sites sent with their replies (None: the site has none)."""
        self.names.update({node: label for node, label in labels.items() if label})

    def name(self, node: int) -> str:
        return self.names.get(node, f"node {node}")

    def add(self, where: str, node: int | None, reason: str) -> None:
        who = "server" if node is None else self.name(node)
        say(f"{where}: {who}: {reason}")
        self.append({"where": where, "node": node, "site": who, "reason": reason})


def usable(
    replies: Iterable[Message], sent: list[Message], where: str, failures: Failures, decode: Decode | None = None
) -> list[tuple[int, Message, Any]]:
    """(node, reply, what ``decode`` read of it) of every usable reply to ``sent``. A reply
    the SuperLink writes itself (node unavailable, message expired) comes from
    SUPERLINK_NODE_ID and names its node only by the message it replies to, whose ID the grid
    set as it pushed it."""
    destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    ok, answered = [], set()
    for msg in replies:
        node = msg.metadata.src_node_id
        if node == SUPERLINK_NODE_ID:
            node = destinations.get(msg.metadata.reply_to_message_id, node)
        answered.add(msg.metadata.reply_to_message_id)
        if msg.has_error():
            failures.add(where, node, f"error reply: {msg.error.reason}")
            continue
        try:
            ok.append((node, msg, decode(node, msg.content) if decode else None))
        except Malformed as err:
            failures.add(where, node, f"malformed reply: {err}")
        except Exception as err:  # noqa: BLE001 - whatever a reply holds, it never ends the run
            failures.add(where, node, f"undecodable reply: {err!r}")
    for message_id, node in destinations.items():
        if message_id not in answered:
            failures.add(where, node, "no reply before the round's timeout")
    return ok


def uniform(ok: list[tuple[int, Message, Any]], where: str, failures: Failures) -> list[tuple[int, Message, Any]]:
    """The replies whose metric keys are those most replies carry; each other one is its
    site's failure (Flower's aggregation refuses replies whose keys differ)."""
    keys = [frozenset(msg.content["metrics"].keys()) for _, msg, _ in ok]
    if not keys:
        return ok
    common = max(set(keys), key=lambda k: (keys.count(k), -keys.index(k)))
    for (node, _, _), own in zip(ok, keys):
        if own != common:
            failures.add(where, node, f"metric keys {sorted(own)} differ from the other sites' {sorted(common)}")
    return [row for row, own in zip(ok, keys) if own == common]


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
    grid: Grid, messages: list[Message], where: str, failures: Failures, decode: Decode, *, timeout: float, least: int
) -> dict[int, Any]:
    """One query phase: send ``messages``, keep each usable reply as ``decode`` read it, by
    node, and stop the stage when fewer than ``least`` remain, naming why the others failed."""
    replies = grid.send_and_receive(messages, timeout=timeout)
    decoded = {node: value for node, _, value in usable(replies, messages, where, failures, decode)}
    if len(decoded) < least:
        reasons = sorted({f["reason"] for f in failures if f["where"] == where})
        raise RuntimeError(
            f"{where}: {len(decoded)} site(s) replied usably, min-train-nodes is {least}"
            + (f"; the others: {'; '.join(reasons)}" if reasons else "")
        )
    return decoded

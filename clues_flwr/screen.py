"""Which replies a phase can use, and a record of every one it cannot.

A reply is usable when it carries no error, its metrics and, where an adapter is expected,
a finite adapter with the reference adapter's keys and shapes. Every rejection, and every
node that was sent a message and did not answer before the round's timeout, is logged and
kept in ``failures``, which the run folder reports.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

from clues_flwr.aggregation import check_state
from clues_flwr.log import say


class Screen:
    def __init__(self, failures: list[dict] | None = None, weighted_by_key: str = "num-examples"):
        self.failures = [] if failures is None else failures
        self.weighted_by_key = weighted_by_key
        self._sent: list[Message] = []

    def sent(self, messages: Iterable[Message]) -> list[Message]:
        """Remember what goes out: a reply the SuperLink writes itself (node unavailable,
        message expired) comes from SUPERLINK_NODE_ID and names its node only by the message
        it replies to, whose ID the grid sets as it pushes it."""
        self._sent = list(messages)
        return self._sent

    def usable(
        self, replies: Iterable[Message], where: str, reference: dict | None = None
    ) -> list[tuple[int, Message]]:
        """(node, reply) of every usable reply to the messages last ``sent``; with
        ``reference`` (the adapter sent) each reply must carry an adapter fit to aggregate."""
        destinations = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        ok, answered = [], set()
        for msg in replies:
            node = msg.metadata.src_node_id
            if node == SUPERLINK_NODE_ID:
                node = destinations.get(msg.metadata.reply_to_message_id, node)
            answered.add(msg.metadata.reply_to_message_id)
            problem = self._problem(msg, reference)
            if problem:
                self.failure(where, node, problem)
            else:
                ok.append((node, msg))
        for message_id, node in destinations.items():
            if message_id not in answered:
                self.failure(where, node, "no reply before the round's timeout")
        self._sent = []
        return ok

    def _problem(self, msg: Message, reference: dict | None) -> str | None:
        if msg.has_error():
            return f"error reply: {msg.error.reason}"
        content = msg.content
        if "metrics" not in content:
            return "reply without metrics"
        if reference is None:
            return None
        if "arrays" not in content:
            return "reply without an adapter"
        problem = check_state(content["arrays"].to_torch_state_dict(), reference)
        if problem:
            return f"adapter rejected: {problem}"
        if self.weighted_by_key not in content["metrics"]:
            return f"reply without {self.weighted_by_key}"
        return None

    def failure(self, where: str, node: int | None, reason: str) -> None:
        who = f"node {node}" if node is not None else "server"
        say(f"{where}: {who}: {reason}")
        self.failures.append({"where": where, "node": node, "reason": reason})

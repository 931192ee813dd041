"""A Flower grid in one process: the ServerApp's messages go through proto serialization
to a ClientApp called directly, one Context per node, no Ray and no SuperLink.

For experiment drivers that run many short federations, for tests (hooks inject faults),
and for stepping through a run in a debugger.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

UNSUPPORTED = "LocalGrid answers get_node_ids and send_and_receive only"
# (node id, message) -> None; raise to make the node fail, or edit the message in place.
Hook = Callable[[int, Message], None]


class Lost(Exception):
    """Raised by a hook: the node never answers, as when it dies and the round times out."""


def app_defaults(pyproject: str | Path | None = None) -> dict:
    """The run-config defaults of ``[tool.flwr.app.config]`` (this project's by default)."""
    path = Path(pyproject) if pyproject else Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the pyproject.toml of the Flower app")
    return tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]


def wire(content: RecordDict) -> RecordDict:
    """What the other side receives: a deserialized copy, as over gRPC."""
    return recorddict_from_proto(recorddict_to_proto(content))


class LocalGrid(Grid):
    """``before`` sees each message a node receives, ``after`` each reply it sends."""

    def __init__(
        self,
        client_app,
        node_configs: dict[int, dict],
        run_config: dict,
        before: Hook | None = None,
        after: Hook | None = None,
    ):
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.client_app = client_app
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config=c, state=RecordDict(), run_config=run_config)
            for n, c in node_configs.items()
        }
        self.before, self.after = before, after
        self.replies: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as a SuperLink stamps it on push
            received = Message(content=wire(msg.content), dst_node_id=node, message_type=msg.metadata.message_type)
            received.metadata.__dict__["_message_id"] = msg.metadata.message_id
            try:
                if self.before:
                    self.before(node, received)
                reply = self.client_app(received, self.contexts[node])
                if self.after:
                    self.after(node, reply)
                reply = Message(content=wire(reply.content), reply_to=received)
            except Lost:
                continue
            except Exception as err:  # as a SuperNode does, a ClientApp exception becomes an error reply
                reply = Message(error=Error(code=0, reason=repr(err)), reply_to=received)
            replies.append(reply)
        self.replies += replies
        return replies

    # CLUES and Flower's strategies use only get_node_ids and send_and_receive;
    # the push/pull API beneath them is not simulated, so it refuses instead of half-working.
    def create_message(self, *args, **kwargs):
        raise NotImplementedError(UNSUPPORTED)

    def push_messages(self, messages):
        raise NotImplementedError(UNSUPPORTED)

    def pull_messages(self, message_ids):
        raise NotImplementedError(UNSUPPORTED)

    def set_run(self, run_id):
        raise NotImplementedError(UNSUPPORTED)

    @property
    def run(self):
        raise NotImplementedError(UNSUPPORTED)


def demo_nodes(num_nodes: int) -> dict[int, dict]:
    """Node configs of ``num_nodes`` demo sites, as Flower's simulation gives them."""
    return {100 + i: {"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)}

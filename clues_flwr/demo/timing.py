"""The demo app's own spans (client handlers, server screening and aggregation, the round
hook), written only when a benchmark (``simulation/bench_rounds.py``) sets ``CLUES_TIMING``."""

from __future__ import annotations

import json
import os
import resource
import time
from contextlib import contextmanager

from clues_flwr.flower.tuning import CluesTuning

# Where the app appends one JSON line per timed span when a benchmark asks for it.
TIMING_ENV = "CLUES_TIMING"


def timing_enabled() -> bool:
    return bool(os.environ.get(TIMING_ENV))


def note(kind: str, start: float, end: float, **extra) -> None:
    """Append a span of the app's own work (wall-clock seconds since the epoch, so the lines
    of every process line up) with this process's peak RSS, when ``CLUES_TIMING`` names a
    file; one ``write`` per line, so concurrent processes do not interleave."""
    if not timing_enabled():
        return
    path = os.environ[TIMING_ENV]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    line = json.dumps({"kind": kind, "pid": os.getpid(), "start": start, "end": end, "rss": rss, **extra})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@contextmanager
def span(kind: str, **extra):
    start = time.time()
    try:
        yield
    finally:
        note(kind, start, time.time(), **extra)


def timing_mod(msg, context, call_next):
    """A ClientApp mod that notes every handler's span (``CLUES_TIMING`` only)."""
    with span(f"client {msg.metadata.message_type}"):
        return call_next(msg, context)


class TimedTuning(CluesTuning):
    """``CluesTuning`` whose server work each round is noted as spans, for the benchmark's
    app-time share (``CLUES_TIMING`` only)."""

    def configure_train(self, *args):
        with span("server configure"):
            return super().configure_train(*args)

    def aggregate_train(self, *args):
        with span("server aggregate"):
            return super().aggregate_train(*args)

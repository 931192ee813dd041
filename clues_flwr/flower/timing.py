"""Wall time and peak memory of a piece of work, the same way on a GPU and on a CPU, for
the benchmarks under ``simulation/``; and the app's own spans (client handlers, server
aggregation and evaluation), written only when a benchmark sets ``CLUES_TIMING``."""

from __future__ import annotations

import json
import os
import resource
import time
from contextlib import contextmanager

import torch


def sync() -> None:
    """Wait for the GPU's queued work, so a timer measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args):
    """(result, seconds) with the GPU's queued work included."""
    sync()
    start = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - start


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int:
    """Bytes: the GPU allocator's peak since ``reset_peak``, or on a CPU the process's peak
    resident set, which cannot be reset (Linux reports it in KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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

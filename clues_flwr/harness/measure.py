"""Wall time and peak memory of a piece of work, the same way on a GPU and on a CPU, for the
benchmarks under ``simulation/``."""

from __future__ import annotations

import resource
import time

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

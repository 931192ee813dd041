"""How many CPU threads torch may use in an app process.

Two torch processes that each take every core thrash (on 2 cores, ten times slower), and a
Flower node often shares its machine: with the simulation's other actors, or with the
site's other work. The count is ``num-threads`` in the node config when given (``flower-supernode
--node-config 'num-threads=4'``); else 1 on a machine with at most 4 cores, where Flower's
default of 2 CPUs per simulated site already oversubscribes the machine once anything else
runs; else ``OMP_NUM_THREADS`` (which Ray sets to an actor's ``client-resources-num-cpus`` in
simulation); else torch's own choice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

FEW_CORES = 4


def thread_count(node_config: Mapping, environ: Mapping[str, str], cores: int | None) -> int | None:
    """The thread count for a process, or None to leave torch's default."""
    given = node_config.get("num-threads")
    if given not in (None, ""):
        return _count("num-threads (node config)", given)
    if (cores or 1) <= FEW_CORES:
        return 1
    env = environ.get("OMP_NUM_THREADS")
    return _count("OMP_NUM_THREADS", env) if env else None


def _count(key: str, value) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{key} must be a whole number of threads, at least 1, got {value!r}")
    return count


def limit_threads(node_config: Mapping | None = None) -> None:
    count = thread_count(node_config or {}, os.environ, os.cpu_count())
    if count is not None and torch.get_num_threads() != count:
        torch.set_num_threads(count)


def threads_mod(msg, context, call_next):
    """A ClientApp mod (``ClientApp(mods=[threads_mod])``): the thread count before every handler."""
    limit_threads(context.node_config)
    return call_next(msg, context)

"""The app under ``flwr run`` on a local simulation SuperLink that this process starts and
stops, for the benchmarks under ``simulation/`` (and their tests).

The SuperLink is named in a fresh ``FLWR_HOME``'s config.toml by its address, not as
``:local:``: a ``:local:`` connection that finds no SuperLink starts a detached one of its
own, which would outlive the caller. Stopping it stops every process group below it, since
the SuperExec leads a session of its own and the simulation's Ray processes in it outlive a
SuperLink stopped mid-run otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

LOG_TAIL = 4000


def tool(name: str) -> str:
    """Flower's command ``name`` from this Python's environment (a virtualenv that was not
    activated has it beside the interpreter, not on PATH), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v) -> str:
    """A run-config value as TOML (a JSON string is a TOML basic string)."""
    if isinstance(v, bool):
        return str(v).lower()
    return json.dumps(v) if isinstance(v, str) else repr(v)


def process_groups(pid: int) -> set[int]:
    """The process group ``pid`` leads and those of all its descendants, from Linux's /proc. The
    SuperLink's SuperExec leads a session of its own, and the simulation's Ray processes in
    it outlive a SuperLink stopped mid-run unless their group is stopped too."""
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            _, ppid, pgid = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        children.setdefault(int(ppid), []).append((int(stat.parent.name), int(pgid)))
    groups, todo = {pid}, [pid]
    while todo:
        for child, pgid in children.get(todo.pop(), []):
            groups.add(pgid)
            todo.append(child)
    return groups


def signal_groups(groups: set[int], sig: int) -> set[int]:
    """The groups that still had a process to signal."""
    alive = set()
    for g in groups:
        try:
            os.killpg(g, sig)
            alive.add(g)
        except ProcessLookupError:
            pass
    return alive


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc`` (started with ``start_new_session``) and every descendant's
    process group, SIGKILL to what is left after 20 s (Ray's agents ignore SIGTERM)."""
    groups = signal_groups(process_groups(proc.pid), signal.SIGTERM)
    deadline = time.monotonic() + 20
    while groups and time.monotonic() < deadline:
        time.sleep(0.2)
        proc.poll()  # reaps the leader, whose zombie would keep its group alive
        groups = signal_groups(groups, 0)
    signal_groups(groups, signal.SIGKILL)
    proc.wait()


def run_logged(cmd: list[str], log: Path, env: dict, timeout: float) -> tuple[int | None, str]:
    """(exit status or None when stopped at ``timeout``, output), the output also in ``log``."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = None
        stop(proc)
    return rc, log.read_text(errors="replace")


def superlink(home: Path, port: int, env: dict, log: Path) -> subprocess.Popen:
    """A simulation SuperLink on ``port``, up and healthy; the caller stops it."""
    cmd = [tool("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--database", str(home / "state.db"), "--disable-runtime-dependency-installation"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise RuntimeError(f"flower-superlink did not come up:\n{log.read_text()[-LOG_TAIL:]}") from None
            time.sleep(0.5)


def flwr_run(
    app: Path, run_config: Path, federation: str, work: Path, timeout: float, env: dict | None = None
) -> tuple[int | None, str]:
    """``flwr run <app> --stream`` with ``run_config`` (a TOML file) and ``federation`` (the
    ``--federation-config`` string) against a SuperLink started for it; (exit status or None
    when stopped at ``timeout``, output). Logs go into ``work``."""
    with tempfile.TemporaryDirectory(prefix="clues-flwr-home-") as home:
        home, port = Path(home), free_port()
        connection = f'[superlink]\ndefault = "local-run"\n\n[superlink.local-run]\naddress = "127.0.0.1:{port}"\n'
        (home / "config.toml").write_text(connection + "insecure = true\n")
        env = {
            **os.environ,
            **(env or {}),
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        link = superlink(home, port, env, work / "superlink.log")
        try:
            cmd = [tool("flwr"), "run", str(app), "local-run", "--stream", "--run-config", str(run_config)]
            return run_logged(cmd + ["--federation-config", federation], work / "flwr-run.log", env, timeout)
        finally:
            stop(link)


def write_run_config(path: Path, config: dict) -> Path:
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in config.items()))
    return path

"""A site's ledger: everything it has released about each record set it holds, by the
records' fingerprint, so that its limits hold per run and across runs rather than per query.

The ledger lives in the run's ``context.state`` and, when the node config sets
``state-dir``, in one JSON file per node there, written before any reply leaves: a replayed
query, a second run, or a restarted SuperNode sees what was released before. Without
``state-dir`` the limits hold within a run only (a SuperNode starts every run with an empty
``context.state``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context

from clues_flwr.core.privacy import SitePolicy

LEDGER_KEY = "clues-ledger"
STATE_DIR_KEY = "state-dir"  # node config: a folder of the site's own


def site_file(context: Context, stem: str, suffix: str, per_run: bool = True) -> Path | None:
    """A file of this node's in its ``state-dir`` (None without one): named by node, and by
    run unless it spans runs, so that nodes sharing a folder never share a file."""
    folder = str(context.node_config.get(STATE_DIR_KEY, ""))
    if not folder:
        return None
    run = f"-run{int(context.run_id)}" if per_run else ""
    return Path(folder) / f"clues-{stem}-node{int(context.node_id)}{run}{suffix}"


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` in ``path``, whole or not at all, on disk before this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


@dataclass
class Ledger:
    """Per record set (its fingerprint): the runs that scored it and applied a threshold to
    it, the bins counted in all, the ε spent, and every release in order."""

    entries: dict[str, dict]
    path: Path | None

    @classmethod
    def of(cls, context: Context) -> Ledger:
        path = site_file(context, "ledger", ".json", per_run=False)
        if path is not None and path.exists():
            try:
                entries = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise RuntimeError(
                    f"{path}: the site's ledger is unreadable ({err}); refusing to release more"
                ) from err
        elif LEDGER_KEY in context.state:
            entries = json.loads(str(context.state[LEDGER_KEY]["json"]))
        else:
            entries = {}
        return cls(entries, path)

    def entry(self, digest: str) -> dict:
        return self.entries.get(digest, {"scorings": [], "thresholds": [], "bins": 0, "epsilon": 0.0, "releases": []})

    def may_score(self, digest: str, run: int, policy: SitePolicy) -> None:
        """Refuse a score query past the site's limits, naming the limit."""
        entry = self.entry(digest)
        if run in entry["scorings"]:
            raise PermissionError(
                "score query refused by this site's policy: these records were scored in this run already "
                "(one score query per run: a second would reveal more of the scores)"
            )
        if len(entry["scorings"]) >= policy.max_scorings:
            raise PermissionError(
                f"score query refused by this site's policy: these records were scored in {len(entry['scorings'])} "
                f"run(s) already; its max-scorings is {policy.max_scorings}"
            )
        if policy.dp_epsilon and entry["epsilon"] + policy.dp_epsilon > policy.dp_budget + 1e-12:
            raise PermissionError(
                f"score query refused by this site's policy: ε = {entry['epsilon']:g} spent on these records, "
                f"another run's {policy.dp_epsilon:g} would pass its dp-budget {policy.dp_budget:g}"
            )

    def may_threshold(self, digest: str, run: int) -> None:
        entry = self.entry(digest)
        if run not in entry["scorings"]:
            raise PermissionError(
                "threshold query refused by this site's policy: these records were not scored in this run"
            )
        if run in entry["thresholds"]:
            raise PermissionError(
                "threshold query refused by this site's policy: one threshold per scoring, and this "
                "scoring's threshold was applied already (a second τ would reveal more of the scores)"
            )

    def release(self, context: Context, digest: str, query: str, epsilon: float, bins: int = 0) -> None:
        """Record one release, on disk (when ``state-dir`` is set) before the reply leaves."""
        entry = self.entry(digest)
        run = int(context.run_id)
        entry["scorings" if query == "score" else "thresholds"].append(run)
        entry["bins"] += bins
        entry["epsilon"] += epsilon
        entry["releases"].append({"run": run, "query": query, "epsilon": epsilon, "bins": bins, "at": time.time()})
        self.entries[digest] = entry
        text = json.dumps(self.entries, indent=1)
        if self.path is not None:
            write_atomic(self.path, text.encode())
        context.state[LEDGER_KEY] = ConfigRecord({"json": text})

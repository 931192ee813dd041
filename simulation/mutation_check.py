"""Do the selection tests catch broken selection code? Each mutant below is a small, plausible
bug in the core or in what guards a site (the protocol's decoders, the site's ledger), the
ones an audit found passing the old tests among them. The script copies
the project into a temporary folder, applies one mutant there, runs the tests meant to catch it
with that copy first on the path, and prints whether they failed (the mutant is *killed*) or
passed (it *survived*, a hole in the tests). Exits non-zero when any mutant survives.

    python simulation/mutation_check.py            # every mutant
    python simulation/mutation_check.py pooled     # the mutants whose name contains 'pooled'
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


class Mutant(NamedTuple):
    name: str
    module: str
    original: str
    replacement: str
    tests: str


MUTANTS = [
    Mutant(
        "S(z) sums the alignments without each checkpoint's learning rate η_t",
        "clues_flwr/core/scoring.py",
        "term = ckpt.lr * a.double().cpu()",
        "term = a.double().cpu()",
        "tests/test_scoring.py",
    ),
    Mutant(
        "pooled: the first site's histogram times the number of sites",
        "clues_flwr/core/fit.py",
        "return np.sum(np.asarray(histograms, dtype=np.float64), axis=0)",
        "return np.asarray(histograms[0], dtype=np.float64) * len(histograms)",
        "tests/test_calibrate.py",
    ),
    Mutant(
        "mixture τ at the accuracy maximum instead of the F1 maximum",
        "clues_flwr/core/fit.py",
        "return 2 * tp / np.maximum(2 * tp + fp + fn, 1e-300)",
        "return tp + (wp - fp)",
        "tests/test_calibrate.py",
    ),
    Mutant(
        "valley rule returns the mixture's τ",
        "clues_flwr/core/fit.py",
        "return float(x[low] - (x[1] - x[0]) / 2)",
        "return mixture_threshold(edges, mixture)",
        "tests/test_calibrate.py",
    ),
    Mutant(
        "EM treats the open end bins as ordinary bins (no censoring)",
        "clues_flwr/core/fit.py",
        "lo, hi = np.concatenate([[-np.inf], e]), np.concatenate([e, [np.inf]])",
        "lo, hi = np.concatenate([[2 * e[0] - e[1]], e]), np.concatenate([e, [2 * e[-1] - e[-2]]])",
        "tests/test_calibrate.py",
    ),
    Mutant(
        "EM stops after 300 iterations, converged or not",
        "clues_flwr/core/fit.py",
        "EM_ITERATIONS = 5000",
        "EM_ITERATIONS = 300",
        "tests/test_calibrate.py",
    ),
    Mutant(
        "pass-rate guard never fires",
        "clues_flwr/flower/report.py",
        "if kept_low > clean_high:",
        "if False:",
        "tests/test_guards.py",
    ),
    Mutant(
        "pass-rate guard compares raw rates (fires without pollution under anchor-mean)",
        "clues_flwr/flower/report.py",
        "if kept_low > clean_high:",
        "if kept / total > sum(clean) / len(clean):",
        "tests/test_guards.py",
    ),
    Mutant(
        "server accepts a histogram that does not add up to its total",
        "clues_flwr/flower/protocol.py",
        "if bins and sum(histogram) + non_finite != total:",
        "if False:",
        "tests/test_screening.py",
    ),
    Mutant(
        "bound off: a kept count above the site's total is accepted",
        "clues_flwr/flower/protocol.py",
        'reply = cls(_count(metrics["kept"], "kept", total), total)',
        'reply = cls(_count(metrics["kept"], "kept"), total)',
        "tests/test_screening.py",
    ),
    Mutant(
        "decoders accept NaN and infinities",
        "clues_flwr/flower/protocol.py",
        "if not math.isfinite(value) or not low <= value <= high:",
        "if math.isfinite(value) and not low <= value <= high:",
        "tests/test_protocol.py",
    ),
    Mutant(
        "ledger off: a second score query in a run is answered",
        "clues_flwr/flower/ledger.py",
        'if run in entry["scorings"]:',
        "if False:",
        "tests/test_adversary.py",
    ),
    Mutant(
        "ε budget off: a site spends past its dp-budget",
        "clues_flwr/flower/ledger.py",
        'if policy.dp_epsilon and entry["epsilon"] + policy.dp_epsilon > policy.dp_budget + 1e-12:',
        "if False:",
        "tests/test_adversary.py",
    ),
    Mutant(
        "site counts over unsorted edges",
        "clues_flwr/core/privacy.py",
        "if any(b <= a for a, b in zip(edges, edges[1:])):",
        "if False:",
        "tests/test_policy.py",
    ),
    Mutant(
        "site counts over any number of bins",
        "clues_flwr/core/privacy.py",
        "if len(edges) - 1 > self.max_histogram_bins:",
        "if False:",
        "tests/test_policy.py",
    ),
    Mutant(
        "a NaN score is kept",
        "clues_flwr/core/threshold.py",
        "return (s >= threshold) & finite",
        "return (s >= threshold) | ~finite",
        "tests/test_policy.py",
    ),
    Mutant(
        "standardise floors the spread at an absolute 1e-12",
        "clues_flwr/core/combine.py",
        "if not spread > SPREAD_FLOOR * scale:",
        "if not spread > 1e-12:",
        "tests/test_baselines.py",
    ),
]


def run(mutant: Mutant, workdir: Path) -> bool:
    """True when the tests fail on the mutated copy (the mutant is killed)."""
    source = workdir / mutant.module
    text = source.read_text()
    if text.count(mutant.original) != 1:
        raise SystemExit(f"{mutant.module}: the text to mutate for {mutant.name!r} is not there exactly once")
    source.write_text(text.replace(mutant.original, mutant.replacement))
    try:
        env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", mutant.tests],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
        )
        return result.returncode != 0
    finally:
        source.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("only", nargs="?", default="", help="run only the mutants whose name contains this")
    args = p.parse_args()
    chosen = [m for m in MUTANTS if args.only in m.name]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "project"
        skip = shutil.ignore_patterns(".git", ".venv*", "runs", "results", "__pycache__")
        shutil.copytree(ROOT, workdir, ignore=skip)
        survived = []
        for mutant in chosen:
            killed = run(mutant, workdir)
            print(f"{'killed  ' if killed else 'SURVIVED'}  {mutant.name}  ({mutant.tests})", flush=True)
            if not killed:
                survived.append(mutant.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()

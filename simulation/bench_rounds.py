"""What a long run costs: the real app under ``flwr run`` (Flower's simulation on Ray), with the
demo model, for ``--nodes`` sites and ``--rounds`` tuning rounds of ``--local-steps`` steps.

    python simulation/bench_rounds.py --nodes 20 --rounds 300 --local-steps 1    # the orchestration floor
    python simulation/bench_rounds.py --nodes 20 --rounds 30 --local-steps 10    # the paper's local work

The app notes its own spans when ``CLUES_TIMING`` names a file (``clues_flwr.demo.timing``):
every ClientApp handler (a ClientApp mod), the server's configure, reply screening and
aggregation, and the per-round hook (central evaluation and run state). A tuning round's
wall time runs from the end of one round hook to the end of the next. Its *app time* is the
length of the union of every span that overlaps it, so handlers running at once count once;
*orchestration* is the rest: Flower and Ray moving messages, scheduling actors, serialising
records (Flower's simulation engine looks for new messages every 0.1 s, so about 0.05 s of
every round is its polling alone). Peak RSS is each
process's ``ru_maxrss`` when it notes a span; the run folder's size is taken at each round
hook. Prints seconds per round (median, p90), the orchestration share, peak RSS of the
ServerApp and the client processes and the run folder's size at round 10 and at the last
round, and last: ``overhead X% of round time; server RSS growth Y MiB over R rounds; run
folder growth Z MiB``. Writes ``bench_rounds.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from clues_flwr.demo.timing import TIMING_ENV
from clues_flwr.harness.bench import parse_set
from clues_flwr.harness.simulate import flwr_run, write_run_config

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def union_within(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] covered by at least one span."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi)
    covered, end = 0.0, lo
    for a, b in clipped:
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered


def rounds_from(events: list[dict]) -> list[dict]:
    """Per tuning round: wall seconds, app seconds, the server's and the clients' peak RSS so
    far, and the run folder's size."""
    hooks = sorted((e for e in events if e["kind"] == "server round hook"), key=lambda e: e["end"])
    spans = [(e["start"], e["end"]) for e in events]
    rows = []
    for before, hook in zip(hooks, hooks[1:]):
        lo, hi = before["end"], hook["end"]
        clients = [e["rss"] for e in events if e["kind"].startswith("client") and e["end"] <= hi]
        rows.append(
            {
                "round": hook["round"],
                "seconds": hi - lo,
                "app_seconds": union_within(spans, lo, hi),
                "server_rss": hook["rss"],
                "client_rss": max(clients, default=0),
                "run_dir": hook["run_dir"],
            }
        )
    return rows


def summary(rows: list[dict]) -> dict:
    seconds = sorted(r["seconds"] for r in rows)
    wall, app = sum(seconds), sum(r["app_seconds"] for r in rows)
    at10 = rows[min(9, len(rows) - 1)]
    last = rows[-1]
    return {
        "rounds": len(rows),
        "median_seconds": statistics.median(seconds),
        "p90_seconds": seconds[min(len(seconds) - 1, round(0.9 * (len(seconds) - 1)))],
        "overhead_share": (wall - app) / wall if wall else 0.0,
        "server_rss_mib": {"round_10": at10["server_rss"] / MIB, "last": last["server_rss"] / MIB},
        "client_rss_mib": {"round_10": at10["client_rss"] / MIB, "last": last["client_rss"] / MIB},
        "run_dir_mib": {"round_10": at10["run_dir"] / MIB, "last": last["run_dir"] / MIB},
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=20)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--num-cpus", type=int, default=1, help="client-resources-num-cpus of each site")
    p.add_argument(
        "--set",
        action="append",
        default=["evaluate-every=10", "save-every=10", 'pollution="0.3"', "demo-pool-size=200"],
        metavar="KEY=VALUE",
        help="run-config override (defaults: a 300-round preset's evaluate-every and save-every; "
        "200 records per site, so that 20 sites fit in the demo's 4,461 records)",
    )
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds before the run is stopped")
    p.add_argument("--work", type=Path, default=Path("runs/bench_rounds"))
    p.add_argument("--out", type=Path, default=Path("results"))
    args = p.parse_args(argv)

    work = args.work.resolve() / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    timing = work / "timing.jsonl"
    config = {"num-server-rounds": args.rounds, "local-steps": args.local_steps, "output-dir": str(work / "runs")}
    config |= parse_set(args.set)
    federation = f"num-supernodes={args.nodes} client-resources-num-cpus={args.num_cpus}"
    start = time.time()
    rc, output = flwr_run(
        ROOT,
        write_run_config(work / "run-config.toml", config),
        federation,
        work,
        args.timeout,
        {TIMING_ENV: str(timing)},
    )
    wall = time.time() - start
    if rc != 0 or "[clues] run folder:" not in output:
        raise SystemExit(f"flwr run failed (exit {rc}); see {work / 'flwr-run.log'}:\n{output[-3000:]}")
    rows = rounds_from([json.loads(line) for line in timing.read_text().splitlines()])
    if len(rows) != args.rounds:
        raise SystemExit(f"{len(rows)} tuning rounds in {timing}, expected {args.rounds}")
    result = {
        "nodes": args.nodes,
        "local_steps": args.local_steps,
        "run_config": config,
        "federation": federation,
        "wall_seconds": wall,
        **summary(rows),
        "per_round": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_rounds.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    print(f"{args.nodes} sites × {args.rounds} rounds × {args.local_steps} local steps in {wall / 60:.1f} min")
    print(f"seconds per round: median {r['median_seconds']:.2f}, p90 {r['p90_seconds']:.2f}")
    for name in ("server_rss_mib", "client_rss_mib", "run_dir_mib"):
        print(f"{name}: round 10 {r[name]['round_10']:.1f}, last {r[name]['last']:.1f}")
    growth = r["server_rss_mib"]["last"] - r["server_rss_mib"]["round_10"]
    folder = r["run_dir_mib"]["last"] - r["run_dir_mib"]["round_10"]
    print(
        f"overhead {100 * r['overhead_share']:.1f}% of round time; server RSS growth {growth:.1f} MiB over "
        f"{args.rounds} rounds; run folder growth {folder:.2f} MiB"
    )
    return result


if __name__ == "__main__":
    main()

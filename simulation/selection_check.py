"""Selection check on the demo data: how well each scoring variant and threshold rule
separates clean from polluted records.

    python simulation/selection_check.py            # ~2 minutes on 2 CPU cores

A global trajectory is traced in process the way the federation does it: every trace round
each client trains from the global adapter, the adapters are averaged by examples (FedAvg)
and so are the clients' scoring-layer AdamW moments; each round's global adapter with the
averaged moments and the learning rate is a checkpoint. The server's validation sums and
anchor scores, and every client's scores, are then computed on those checkpoints. Raw
per-sample gradients are computed once per checkpoint and shared by all variants.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clues_flwr.aggregation import fedavg
from clues_flwr.data import demo_splits, parse_ratios
from clues_flwr.metrics import auroc, confusion, selection_scores
from clues_flwr.model import ModelSpec, adapter_state, build, load_tokenizer, set_adapter_state
from clues_flwr.scoring import ScoreConfig, gamma_from_grads, gammas, scoring_names, threshold
from clues_flwr.train import train_steps
from clues_flwr.trajectory import Checkpoint, moments

VARIANTS = {
    "paper (adam)": ScoreConfig.paper(),
    "paper + cosine": ScoreConfig(precondition="adam", bias_correction=True, precondition_validation=True, cosine=True),
    "official (eps inside, raw val)": ScoreConfig.official(),
    "official + cosine": ScoreConfig(precondition="adam-eps-inside", bias_correction=False, precondition_validation=False, cosine=True),
    "sgd (raw inner products)": ScoreConfig(precondition="sgd", cosine=False),
    "sgd + cosine": ScoreConfig(precondition="sgd", cosine=True),
}


def trace(model, tok, pools, rounds, steps, batch_size, lr, max_len, names) -> list[Checkpoint]:
    """Global trajectory: FedAvg of adapters and of the scoring layer's moments per round."""
    global_adapter = adapter_state(model)
    trajectory = []
    for rnd in range(1, rounds + 1):
        adapters, ms, vs = [], [], []
        for i, pool in enumerate(pools):
            set_adapter_state(model, global_adapter)
            _, opt = train_steps(model, tok, pool, steps, batch_size, lr, max_len, seed=1009 * rnd + i)
            m, v, _ = moments(model, opt, names)
            adapters.append(adapter_state(model))
            ms.append(m)
            vs.append(v)
        weights = [len(p) for p in pools]
        global_adapter = fedavg(adapters, weights)
        trajectory.append(
            Checkpoint(
                adapter=global_adapter,
                exp_avg=fedavg(ms, weights),
                exp_avg_sq=fedavg(vs, weights),
                step=steps,
                lr=lr,
                round=rnd,
            )
        )
    return trajectory


def variant_scores(raw, trajectory, names, cfg):
    """S for every set from the cached raw gradients, under one variant."""
    total = {k: 0.0 for k in raw[0] if k != "validation"}
    for ckpt, grads in zip(trajectory, raw):

        raw_val = not cfg.precondition_validation
        g_val = gamma_from_grads(grads["validation"], ckpt, names, cfg, raw_val).sum(0).double()
        for key in total:
            total[key] = total[key] + ckpt.lr * (gamma_from_grads(grads[key], ckpt, names, cfg).double() @ g_val)
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace-rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--pool-size", type=int, default=240)
    p.add_argument("--pollution", default="0.8,0.2,0.1,0.5")
    p.add_argument("--recall", type=float, nargs="+", default=[0.9, 0.8])
    p.add_argument("--quantization", default="8bit")
    p.add_argument("--model-name", default=":demo:")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/selection_check.json"))
    args = p.parse_args()

    start = time.time()
    ratios = parse_ratios(args.pollution)
    splits = demo_splits(len(ratios), args.pool_size, ratios, seed=args.seed)
    model = build(ModelSpec(name=args.model_name, quantization=args.quantization, seed=args.seed))
    tok = load_tokenizer(args.model_name)
    names = scoring_names(model, args.layer)
    trajectory = trace(model, tok, splits.pools, args.trace_rounds, args.local_steps, args.batch_size, args.lr, args.max_len, names)
    print(f"traced {len(trajectory)} checkpoints in {time.time() - start:.0f}s")

    sets = {"validation": splits.validation, "anchors": splits.anchors}
    sets.update({f"client{i}": pool for i, pool in enumerate(splits.pools)})
    raw_cfg = ScoreConfig(layer=args.layer, batch_size=args.batch_size, max_len=args.max_len, cosine=False)
    raw = [{k: gammas(model, tok, recs, c, names, raw_cfg, raw=True) for k, recs in sets.items()} for c in trajectory]
    print(f"per-sample gradients of {sum(map(len, sets.values()))} records x {len(trajectory)} checkpoints in {time.time() - start:.0f}s")

    clean = {f"client{i}": [r["quality"] == "high" for r in pool] for i, pool in enumerate(splits.pools)}
    kinds = [r["pollution"] for pool in splits.pools for r in pool]
    rules = [("anchor-mean", None)] + [("anchor-quantile", r) for r in args.recall]
    rows = []
    for vname, cfg in VARIANTS.items():
        s = variant_scores(raw, trajectory, names, cfg)
        client_auroc = {k: auroc(s[k].tolist(), clean[k]) for k in clean}
        pooled = torch.cat([s[k] for k in clean]).tolist()
        pooled_clean = [c for k in clean for c in clean[k]]
        by_kind = {
            kind: auroc(*zip(*[(x, c) for x, c, kd in zip(pooled, pooled_clean, kinds) if c or kd == kind]))
            for kind in sorted(set(kinds) - {"none"})
        }
        for rule, recall in rules:
            tau = threshold(s["anchors"], rule, recall or 0.9)
            counts = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
            kept = {}
            for k in clean:
                c = confusion((s[k] >= tau).tolist(), clean[k])
                counts = {x: counts[x] + c[x] for x in counts}
                kept[k] = f"{c['tp'] + c['fp']}/{len(clean[k])}"
            rows.append(
                {
                    "variant": vname,
                    "rule": rule if recall is None else f"{rule} r={recall}",
                    "tau": tau,
                    "auroc_pooled": auroc(pooled, pooled_clean),
                    "auroc_per_client": client_auroc,
                    "auroc_by_kind": by_kind,
                    "kept": kept,
                    **selection_scores(counts),
                }
            )
    print(f"scored all variants in {time.time() - start:.0f}s\n")
    print("| variant | threshold | AUROC pooled | AUROC per client | P | R | F1 | Acc | kept per client |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        per = " / ".join(f"{v:.3f}" for v in r["auroc_per_client"].values())
        kept = " ".join(r["kept"].values())
        print(
            f"| {r['variant']} | {r['rule']} | {r['auroc_pooled']:.3f} | {per} | {r['precision']:.1f} | "
            f"{r['recall']:.1f} | {r['f1']:.1f} | {r['accuracy']:.1f} | {kept} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")
    print("\nAUROC of clean against each pollution kind (pooled over clients):")
    for r in rows[:: len(rules)]:
        print(f"  {r['variant']}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["auroc_by_kind"].items()))
    print(f"\nwrote {args.out} ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()

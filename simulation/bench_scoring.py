"""Benchmark: what the batched per-sample gradients of clues_flwr.core.scoring buy.

Three ways to compute the CLUES score of training records z,

    S(z) = Σ_t η_t ⟨Σ_{z' ∈ val} Γ(z'; θ_t), Γ(z; θ_t)⟩,

all with the same preconditioning (``ScoreConfig.paper()``) and the same trajectory:

1. batched   ``validation_sums`` then ``scores``: one forward and backward per padded batch,
             the validation set summed once per checkpoint (the library's way).
2. official  the official code's way: one sample at a time (a batch of one); the
             validation Γ vectors are computed once per checkpoint and cached one by one
             (not summed), and every training Γ is dotted with each cached vector.
3. alg1      Algorithm 1 as printed in the paper's appendix: for every training sample
             and checkpoint the validation gradients are recomputed inside the loop,
             O(T·|D|·|D_val|) backward passes, so it runs on a few records only.

How throughput is counted, the same for all three: "samples/s" is training records
scored per second over the WHOLE trajectory (all T checkpoints), including every
validation-gradient cost the method pays. The batched method's validation sums and the
official way's cached validation gradients are timed together with the training records
and so are amortised over them; Algorithm 1 recomputes them inside its loop by
definition. Every timed section is preceded by a small warm-up call.

The script also times LoRA training steps (``train_steps``) to put one sample's scoring
cost next to one sample's training cost, checks that the three methods agree, prints a
Markdown table and writes the figures to JSON.

    python simulation/bench_scoring.py                      # demo and big models, CPU or GPU
    python simulation/bench_scoring.py --models big --samples 256 --val 50 --batch-size 32
    python simulation/bench_scoring.py --models "" --llama7b   # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from clues_flwr.core.adapter import adapter_state, set_adapter_state
from clues_flwr.core.data import batches, to_device
from clues_flwr.core.scoring import ScoreConfig, gamma_from_grads, scores, scoring_mode, scoring_names, validation_sums
from clues_flwr.core.train import TrainConfig, train_steps, training
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.demo.dataset import demo_splits
from clues_flwr.harness.measure import timed
from clues_flwr.model import ModelSpec, build, device, load_base, load_tokenizer

# Agreement bound on the CPU, where every method computes in float32 (the 8-bit demo too:
# per_sample_grads keeps bitsandbytes on its training path, see scoring.scoring_mode).
STRICT = 1e-4
# Batched vs batch-of-one on CUDA: the forward runs under bf16 autocast, whose kernels
# round differently for other shapes, so the two are close, not equal; the library's
# algebra is then checked by running it with batch_size=1 against the batch-of-one loops,
# see check().
LOOSE = 0.1
# Batch-of-one vs batch-of-one on CUDA: attention backward kernels may accumulate with
# atomics, so two runs on the same sample can differ at bf16 rounding; on the CPU they
# are bit-identical and STRICT applies.
CUDA_SAME_SHAPES = 1e-2

LLAMA7B = dict(
    hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,big", help="comma-separated: demo, big (may be empty)")
    p.add_argument("--samples", type=int, default=256, help="training records scored")
    p.add_argument("--val", type=int, default=16, help="validation records")
    p.add_argument("--checkpoints", type=int, default=2, help="trajectory length T")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="batch size of the batched scorer and of the timed training steps (the app's score-batch-size default)",
    )
    p.add_argument("--alg1-samples", type=int, default=4, help="training records Algorithm 1 is timed on")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--max-len", type=int, default=96)
    p.add_argument("--big-hidden", type=int, default=1024)
    p.add_argument("--big-layers", type=int, default=8)
    p.add_argument("--big-heads", type=int, default=16)
    p.add_argument("--big-intermediate", type=int, default=2816)
    p.add_argument("--llama7b", action="store_true", help="also a random Llama-2-7B-shaped model in 8-bit (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_scoring.json")
    return p.parse_args(argv)


# --- models and trajectory -------------------------------------------------------------


def lora(base, seed: int):
    """LoRA r=16, alpha=32 on q/v like ``ModelSpec``'s default, with B ~ N(0, 0.01):
    with peft's B = 0 the gradient of A would be zero and half the scored vector empty."""
    torch.manual_seed(seed)
    model = get_peft_model(
        base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    return model


def big_model(args, vocab: int):
    """A random-weight float32 Llama, big enough that matmuls, not Python, dominate."""
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.big_hidden,
        num_hidden_layers=args.big_layers,
        num_attention_heads=args.big_heads,
        num_key_value_heads=args.big_heads,
        intermediate_size=args.big_intermediate,
        max_position_embeddings=max(256, args.max_len),
    )
    base = LlamaForCausalLM(cfg).to(device())
    base.config.use_cache = False
    return lora(base, args.seed)


def llama7b_model(seed: int, shape: dict = LLAMA7B):
    """Random Llama-2-7B-shaped weights, saved in fp16 and loaded back in 8-bit the way
    the app loads a real base (``load_base``): the quantised path is what a site runs.

    The fp16 model is built directly on the GPU (default dtype fp16 while constructing) so
    that 7B random weights are neither drawn on the CPU nor held in float32.
    """
    cfg = LlamaConfig(num_key_value_heads=shape["num_attention_heads"], max_position_embeddings=4096, **shape)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device()):
            fp16 = LlamaForCausalLM(cfg).to(torch.float16)
    finally:
        torch.set_default_dtype(default)
    with tempfile.TemporaryDirectory(prefix="bench-llama7b-") as folder:
        fp16.save_pretrained(folder)
        del fp16
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        base = load_base(folder, "8bit")  # fully read into memory before the folder goes
    return lora(base, seed)


def random_trajectory(model, names: list[str], n: int, seed: int) -> list[Checkpoint]:
    """T checkpoints with random adapters (A ~ N(0, 1/fan_in), B ~ N(0, 0.01)) and random
    AdamW moments of the scoring weights (m ~ N(0, 1e-3²), v ~ U(0, 1e-5))."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n_: p.shape for n_, p in model.named_parameters() if n_ in names}
    out = []
    for t in range(n):
        adapter = {
            k: torch.randn(v.shape, generator=g) * (0.01 if "lora_B" in k else v.shape[1] ** -0.5)
            for k, v in adapter_state(model).items()
        }
        m = {k: torch.randn(s, generator=g) * 1e-3 for k, s in shapes.items()}
        v = {k: torch.rand(s, generator=g) * 1e-5 for k, s in shapes.items()}
        out.append(Checkpoint(adapter=adapter, exp_avg=m, exp_avg_sq=v, step=10 * (t + 1), lr=1e-3 / (t + 1)))
    return out


# --- the three scorers -------------------------------------------------------------------


def batched(model, tok, train, val, traj, cfg, max_len):
    """The library: validation sums once per checkpoint, then batched training Γ."""
    return scores(model, tok, train, traj, validation_sums(model, tok, val, traj, cfg, max_len), cfg, max_len)


def gamma_one(model, tok, record, ckpt, names, cfg, max_len, raw=False) -> torch.Tensor:
    """Γ(z; θ_t) of one record as the official code gets it: a batch of one through the
    model's own loss (logits at every position), ``loss.backward()`` into every LoRA
    weight, then the scoring layer's ``.grad`` read out. For one record the model's loss
    is the mean over its answer tokens, S's per-sample loss. The adapter of ``ckpt`` must
    already be loaded."""
    scoring_mode(model)
    batch = to_device(next(batches([record], tok, 1, max_len)), model)
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else nullcontext():
        loss = model(**batch).loss
    loss.backward()
    g = torch.cat([params[n].grad.reshape(-1).float() for n in names])[None]
    model.zero_grad(set_to_none=True)
    return gamma_from_grads(g, ckpt, names, cfg, raw)[0].double()


def official(model, tok, train, val, traj, cfg, max_len):
    """Batch of one; per checkpoint the validation Γ are cached as a list, then each
    training Γ is dotted with every cached vector."""
    names = scoring_names(model, cfg)
    raw_val = not cfg.precondition_validation
    out = torch.zeros(len(train), dtype=torch.float64)
    for ckpt in traj:
        set_adapter_state(model, ckpt.adapter)
        cache = [gamma_one(model, tok, z, ckpt, names, cfg, max_len, raw=raw_val) for z in val]
        for i, z in enumerate(train):
            g = gamma_one(model, tok, z, ckpt, names, cfg, max_len)
            out[i] += ckpt.lr * sum(float(v @ g) for v in cache)
    return out


def algorithm1(model, tok, train, val, traj, cfg, max_len):
    """The appendix's loop: sample, then checkpoint, then every validation sample's
    gradient recomputed where it is used."""
    names = scoring_names(model, cfg)
    raw_val = not cfg.precondition_validation
    out = torch.zeros(len(train), dtype=torch.float64)
    for i, z in enumerate(train):
        for ckpt in traj:
            set_adapter_state(model, ckpt.adapter)
            g = gamma_one(model, tok, z, ckpt, names, cfg, max_len)
            for zv in val:
                out[i] += ckpt.lr * float(gamma_one(model, tok, zv, ckpt, names, cfg, max_len, raw=raw_val) @ g)
    return out


# --- checks and timing -----------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor, spread: float) -> float:
    """RMS of a − b over the records both have, relative to ``spread``, the standard
    deviation of the reference scores over all scored records.

    Relative to the spread, not to the scores' size: the random moments give every record
    a large common part of S, and an error measured against it would hide errors in what
    ranks the records. One spread for every pair, so that Algorithm 1's few records are
    held to the same yardstick, and a score near zero cannot blow the figure up.
    """
    return float((a.double() - b.double()).pow(2).mean().sqrt() / spread)


def tolerances(model) -> tuple[float, float]:
    """(bound between batch-of-one runs, bound batched vs batch-of-one) for this model."""
    if model.device.type == "cuda":
        return CUDA_SAME_SHAPES, LOOSE
    return STRICT, STRICT


def check(model, tok, train, val, traj, cfg, max_len, s_batched, s_official, s_alg1) -> dict:
    """Relative errors between the methods on the records they share; asserts agreement.

    A float32 model on the CPU computes identically in batches and one by one, so all must
    agree to STRICT. Otherwise (int8 base, CUDA autocast) batched vs batch-of-one is held
    to LOOSE only, and the library's own algebra (validation sums, preconditioning, dot
    products) is checked tightly by running it with batch_size=1, where its kernels see
    what the loops see.
    """
    same, across = tolerances(model)
    k, spread = len(s_alg1), float(s_official.std())
    errs = {
        "batched_vs_official": rel_err(s_batched, s_official, spread),
        "alg1_vs_official": rel_err(s_alg1, s_official[:k], spread),
        "batched_vs_alg1": rel_err(s_batched[:k], s_alg1, spread),
    }
    if across > same:
        one = ScoreConfig(**{**cfg.__dict__, "batch_size": 1})
        s_one = batched(model, tok, train[:k], val, traj, one, max_len)
        errs["library_batch1_vs_official"] = rel_err(s_one, s_official[:k], spread)
    progress("  rel. err  " + ", ".join(f"{k_} {v:.1e}" for k_, v in errs.items()))
    assert errs["alg1_vs_official"] <= same and errs.get("library_batch1_vs_official", 0) <= same, errs
    assert errs["batched_vs_official"] <= across and errs["batched_vs_alg1"] <= across, errs
    return errs


def train_seconds_per_sample(model, tok, records, args) -> float:
    """One LoRA training step's cost per sample (forward, backward, AdamW), the yardstick
    a site compares scoring with; timed after one warm-up step."""
    train = TrainConfig(learning_rate=1e-4, batch_size=args.batch_size, max_seq_len=args.max_len)
    train_steps(training(model, tok, records, train, seed=0), 1)
    _, seconds = timed(lambda: train_steps(training(model, tok, records, train, seed=0), args.train_steps))
    return seconds / (args.train_steps * args.batch_size)


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def bench(model, tok, train, val, args) -> dict:
    """All three scorers on one model, each after a small warm-up, then the check and
    the training yardstick."""
    cfg, max_len = ScoreConfig.paper(batch_size=args.batch_size), args.max_len
    names = scoring_names(model, cfg)
    traj = random_trajectory(model, names, args.checkpoints, args.seed + 1)
    n, t, sub = len(train), len(traj), train[: args.alg1_samples]

    batched(model, tok, train[: args.batch_size], val[:2], traj[:1], cfg, max_len)
    sums, t_val = timed(validation_sums, model, tok, val, traj, cfg, max_len)
    s_batched, t_train = timed(scores, model, tok, train, traj, sums, cfg, max_len)
    t_batched = t_val + t_train
    progress(f"  batched   {t_batched:8.2f} s ({t_val:.2f} s validation sums)")

    official(model, tok, train[:1], val[:1], traj[:1], cfg, max_len)
    s_official, t_official = timed(official, model, tok, train, val, traj, cfg, max_len)
    progress(f"  official  {t_official:8.2f} s")

    algorithm1(model, tok, train[:1], val[:1], traj[:1], cfg, max_len)
    s_alg1, t_alg1 = timed(algorithm1, model, tok, sub, val, traj, cfg, max_len)
    progress(f"  alg1      {t_alg1:8.2f} s on {len(sub)} records")

    errs = check(model, tok, train, val, traj, cfg, max_len, s_batched, s_official, s_alg1)
    train_s = train_seconds_per_sample(model, tok, train, args)
    progress(f"  training  {train_s:8.4f} s per sample")
    rate = {"batched": n / t_batched, "official": n / t_official, "alg1": len(sub) / t_alg1}
    score_s = t_batched / (n * t)
    return {
        "params": count_params(model),
        "scoring_dim": sum(dict(model.named_parameters())[k].numel() for k in names),
        "samples": n,
        "val": len(val),
        "checkpoints": t,
        "alg1_samples": len(sub),
        "batch_size": args.batch_size,
        "seconds": {"batched": t_batched, "batched_validation_sums": t_val, "official": t_official, "alg1": t_alg1},
        "samples_per_s": rate,
        "batched_over_official": rate["batched"] / rate["official"],
        "batched_over_alg1": rate["batched"] / rate["alg1"],
        "train_seconds_per_sample": train_s,
        "score_seconds_per_sample_per_checkpoint": score_s,
        "score_over_train": score_s / train_s,
        "rel_err": errs,
        "max_rel_err": max(errs.values()),
        "tolerances": dict(zip(("batch_of_one", "batched_vs_batch_of_one"), tolerances(model))),
    }


def bench_llama7b(tok, train, val, args) -> dict:
    """Batched scoring throughput and peak GPU memory on a 7B-shaped 8-bit base."""
    model = llama7b_model(args.seed)
    cfg, max_len = ScoreConfig.paper(batch_size=args.batch_size), args.max_len
    traj = random_trajectory(model, scoring_names(model, cfg), args.checkpoints, args.seed + 1)
    batched(model, tok, train[: args.batch_size], val[:2], traj[:1], cfg, max_len)
    torch.cuda.reset_peak_memory_stats()
    _, seconds = timed(batched, model, tok, train, val, traj, cfg, max_len)
    peak = torch.cuda.max_memory_allocated()
    progress(f"  batched   {seconds:8.2f} s, peak {peak / 2**30:.2f} GiB")
    return {
        "params": count_params(model),
        "samples": len(train),
        "val": len(val),
        "checkpoints": len(traj),
        "batch_size": args.batch_size,
        "seconds": {"batched": seconds},
        "samples_per_s": {"batched": len(train) / seconds},
        "max_memory_allocated_bytes": peak,
    }


# --- report ------------------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(results: dict) -> str:
    """The figures as a Markdown table; a dash where a method was not run."""

    def fmt(x, spec):
        return "—" if x is None else format(x, spec)

    head = [
        "model",
        "params",
        "batched samples/s",
        "official samples/s",
        "alg1 samples/s",
        "batched/official",
        "batched/alg1",
        "score/train per sample",
        "max rel. err",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        rate = r["samples_per_s"]
        cells = [
            name,
            f"{r['params'] / 1e6:.1f}M",
            fmt(rate.get("batched"), ".2f"),
            fmt(rate.get("official"), ".2f"),
            fmt(rate.get("alg1"), ".3f"),
            fmt(r.get("batched_over_official"), ".1f") + ("×" if "batched_over_official" in r else ""),
            fmt(r.get("batched_over_alg1"), ".1f") + ("×" if "batched_over_alg1" in r else ""),
            fmt(r.get("score_over_train"), ".2f"),
            fmt(r.get("max_rel_err"), ".1e"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def records(n: int, args):
    """n training records from the demo pool and the first ``--val`` validation records."""
    splits = demo_splits(num_clients=1, pool_size=n, seed=args.seed)
    if len(splits.validation) < args.val:
        sys.exit(f"--val {args.val}: the demo has only {len(splits.validation)} validation records")
    return splits.pools[0], splits.validation[: args.val]


def main(argv=None) -> dict:
    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := sorted(set(models) - {"demo", "big"}):
        sys.exit(f"--models: unknown {unknown}; choose from demo, big")
    if args.llama7b and not torch.cuda.is_available():
        sys.exit(
            "--llama7b needs a CUDA GPU (an 8-bit 7B base is loaded with bitsandbytes on the GPU); none is visible here"
        )
    if args.samples < 2 or not 1 <= args.alg1_samples <= args.samples:
        sys.exit(
            "need --samples >= 2 (the check measures errors against the scores' spread) "
            "and 1 <= --alg1-samples <= --samples"
        )
    start, cpu_start = time.perf_counter(), time.process_time()
    tok = load_tokenizer(":demo:")
    env = {
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    results = {}
    for name in models:
        progress(f"{name}:")
        train, val = records(args.samples, args)
        if name == "demo":
            model = build(ModelSpec(quantization="8bit", seed=args.seed))
        else:
            model = big_model(args, len(tok))
        results[name] = bench(model, tok, train, val, args)
        del model
    if args.llama7b:
        progress("llama7b:")
        train, val = records(args.samples, args)
        results["llama7b"] = bench_llama7b(tok, train, val, args)
    wall = time.perf_counter() - start
    # Other processes on the machine slow small-op workloads badly (torch's threads wait
    # for each other); this process's share of its threads' time shows whether they did.
    env["loadavg_end"] = os.getloadavg()
    env["cpu_share"] = (time.process_time() - cpu_start) / (wall * env["threads"])
    print(table(results))
    busy = "" if torch.cuda.is_available() else f", busy {env['cpu_share']:.0%} of the time"
    print(
        f"\nwall time {wall:.0f} s on {env['device']} ({env['threads']} torch threads{busy}, load average "
        f"{env['loadavg_start'][0]:.1f} at start); samples/s = training records scored per second over all "
        "checkpoints, validation cost included"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "env": env, "wall_seconds": wall, "models": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {out}")
    return report


if __name__ == "__main__":
    main()

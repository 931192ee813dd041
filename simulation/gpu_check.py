"""The figures only a GPU gives, in one run that fits a lent machine (one H100/H200, at most
10 minutes). Three parts, run in ``--parts`` order (by default this one), each guarded so that
one failing leaves the others' figures (its error text is recorded instead):

1. ``llama``: a random-weight Llama-2-7B-shaped base, saved and loaded back in 8-bit through
   the app's own ``build`` (the path a site runs), LoRA r16 on q_proj/v_proj. Timed AdamW
   steps at batch 16 × 512 tokens (samples/s, peak memory); each timed step leaves a
   trajectory checkpoint, on which CLUES scoring is timed batched (the library's
   ``per_sample_grads``) and the official code's way (a batch of one through the model's own
   loss), on the same model and the same synthetic records.
2. ``flwr``: the demo app under ``flwr run``, 4 simulated sites sharing the GPU
   (``client-resources-num-gpus=0.25``) for 3 trace and 3 tuning rounds, against a
   simulation SuperLink this script starts on a free port and stops.
3. ``scale``: ``simulation/backbone_scale.py`` at one backbone size pretrained on the GPU.

A part that would start after ``--budget-s`` is skipped, and a subprocess part is stopped
when the budget runs out. One JSON (``--out``, rewritten after every part so that a machine
taken back mid-run leaves what was measured) holds every figure, each part's seconds, the
versions and the GPU's name. Logs, run folders and backbones go under ``--work``.

On the GPU machine (a CUDA build of torch; the defaults stop starting parts after 9 minutes):

    python simulation/gpu_check.py

The CPU dry run (tiny sizes, every code path but CUDA's; about 100 s on 2 cores):

    OMP_NUM_THREADS=1 python simulation/gpu_check.py --device cpu --hidden 64 --layers 2 --heads 4 \\
        --intermediate 128 --vocab 256 --batch 4 --seq-len 32 --score-samples 8 --score-val 2 \\
        --sites 2 --rounds 1 --gpu-share 0 --scale-size 64x1 --scale-steps 2 --set demo-pool-size=24 \\
        --set pollution=0.5,0.5 --set local-steps=1 --set test-size=20 --set trace-rounds=1 \\
        --set max-new-tokens=4 --out runs/gpu_check_dry.json --work runs/gpu_check_dry
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path

import torch

from clues_flwr.core.adapter import adapter_state, set_adapter_state
from clues_flwr.core.data import to_device
from clues_flwr.core.scoring import ScoreConfig, along, gamma_from_grads, per_sample_grads, scoring_mode, scoring_names
from clues_flwr.core.train import TrainConfig
from clues_flwr.core.trajectory import checkpoint
from clues_flwr.harness.bench import parse_set, run_config
from clues_flwr.harness.measure import peak_memory, reset_peak, timed
from clues_flwr.harness.simulate import flwr_run, run_logged, write_run_config
from clues_flwr.model import ModelSpec, build, device

# Nothing above asks CUDA for its devices, so main can still hide them for --device cpu;
# transformers is imported where used, since it may load bitsandbytes, which asks.
ROOT = Path(__file__).resolve().parent.parent
PARTS = ("llama", "flwr", "scale")
LOG_TAIL = 3000  # characters of a failed part's output kept in the JSON


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu hides every GPU from every part")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=540, help="no part starts after this many seconds")
    p.add_argument("--out", type=Path, default=Path("results/gpu_check.json"))
    p.add_argument("--work", type=Path, default=Path("runs/gpu_check"), help="logs, run folders, backbones")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("llama: the Llama-shaped base (defaults: Llama-2-7B)")
    g.add_argument("--hidden", type=int, default=4096)
    g.add_argument("--layers", type=int, default=32)
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--intermediate", type=int, default=11008)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--quantization", default="8bit", choices=("8bit", "none"))
    g.add_argument("--batch", type=int, default=16, help="records per training step and per scoring batch")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per record, the second half its answer")
    g.add_argument("--train-steps", type=int, default=2, help="timed steps after one warm-up; one checkpoint each")
    g.add_argument("--score-samples", type=int, default=32, help="training records scored")
    g.add_argument("--score-val", type=int, default=8, help="validation records")
    g = p.add_argument_group("flwr and scale: the demo app")
    g.add_argument("--sites", type=int, default=4, help="simulated sites (flwr) and demo sites (scale)")
    g.add_argument("--rounds", type=int, default=3, help="flwr's trace rounds and tuning rounds")
    g.add_argument("--gpu-share", type=float, default=0.25, help="client-resources-num-gpus of each site")
    g.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override for flwr and scale"
    )
    g.add_argument("--scale-size", default="512x8", help="backbone_scale's --sizes (hidden x layers)")
    g.add_argument("--scale-steps", type=int, default=2000, help="backbone_scale's --pretrain-steps")
    args = p.parse_args(argv)
    if args.score_samples < 2 or min(args.score_val, args.train_steps, args.batch) < 1 or args.seq_len < 2:
        p.error("need --score-samples >= 2 (rel_err is relative to their spread), --seq-len >= 2 and the rest >= 1")
    args.out, args.work = args.out.resolve(), args.work.resolve()  # the app's output-dir is read elsewhere
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if not args.parts or not set(args.parts) <= set(PARTS):
        p.error(f"--parts: one or more of {', '.join(PARTS)}, got {args.parts}")
    return args


# --- llama: training and scoring throughput ---------------------------------------------


def llama_lora(args):
    """Random weights saved and loaded back through ``clues_flwr.model.build``, so the
    quantisation and LoRA are the app's. Built on the GPU in fp16 (as a hub checkpoint is
    stored) so that 7B random weights are neither drawn on the CPU nor held in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(4096, args.seq_len),
    )
    dev = device()
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if dev.type == "cuda" else torch.float32)
    try:
        with torch.device(dev):
            fp = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    with tempfile.TemporaryDirectory(prefix="gpu-check-llama-") as folder:
        fp.save_pretrained(folder)
        del fp
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return build(ModelSpec(name=folder, quantization=args.quantization, seed=args.seed))


def synthetic_batches(n: int, args, gen) -> list[dict]:
    """``n`` records of random tokens in batches of ``--batch``; the second half of each is
    its answer, the only tokens the loss and every score count (as in ``data.encode``)."""
    out = []
    for start in range(0, n, args.batch):
        ids = torch.randint(args.vocab, (min(args.batch, n - start), args.seq_len), generator=gen)
        labels = ids.clone()
        labels[:, : args.seq_len // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train(model, args, gen) -> tuple[dict, list]:
    """AdamW steps as ``clues_flwr.core.train.training`` takes them (the app's learning rate
    and weight decay); a checkpoint after each timed step makes the scoring trajectory."""
    names = scoring_names(model, ScoreConfig())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=TrainConfig.learning_rate, weight_decay=TrainConfig.weight_decay)
    model.train()

    def step(batch):
        loss = model(**to_device(batch, model)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(synthetic_batches(args.batch, args, gen)[0])  # kernels, allocator, optimizer state
    reset_peak()
    seconds, losses, trajectory = 0.0, [], []
    for _ in range(args.train_steps):
        loss, s = timed(step, synthetic_batches(args.batch, args, gen)[0])
        seconds += s
        losses.append(loss)
        trajectory.append(checkpoint(model, opt, names, adapter_state(model)))
    samples = args.train_steps * args.batch
    return {
        "steps": args.train_steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "seconds_per_step": seconds / args.train_steps,
        "samples_per_s": samples / seconds,
        "tokens_per_s": samples * args.seq_len / seconds,
        "peak_memory_bytes": peak_memory(),
        "losses": losses,
    }, trajectory


def batched_scores(model, train_batches, val_batches, trajectory, names, cfg):
    """The library's way: per checkpoint the validation Γ summed once, then every training
    record's Γ from one forward and backward per batch."""

    def gammas(batches, ckpt, raw=False):
        return torch.cat([gamma_from_grads(per_sample_grads(model, b, names), ckpt, names, cfg, raw) for b in batches])

    def aligned():
        for ckpt in trajectory:
            set_adapter_state(model, ckpt.adapter)
            g_val = gammas(val_batches, ckpt, raw=not cfg.precondition_validation).sum(0)
            yield gammas(train_batches, ckpt).double() @ g_val.double()

    return along(trajectory, aligned())


def gamma_one(model, batch, ckpt, names, cfg, raw=False):
    """Γ of one record the official code's way: a batch of one through the model's own
    loss (logits at every position), ``backward`` into every LoRA weight, the scoring
    layer's ``.grad`` read out."""
    scoring_mode(model)
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16) if model.device.type == "cuda" else nullcontext():
        loss = model(**to_device(batch, model)).loss
    loss.backward()
    g = torch.cat([params[n].grad.reshape(-1).float() for n in names])[None]
    model.zero_grad(set_to_none=True)
    return gamma_from_grads(g, ckpt, names, cfg, raw)[0].double()


def one_by_one(batches):
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(b["input_ids"]))]


def official_scores(model, train_batches, val_batches, trajectory, names, cfg):
    """Per checkpoint the validation Γ cached one by one (not summed), and every training
    record's Γ dotted with each of them, as the official code does."""
    train, val = one_by_one(train_batches), one_by_one(val_batches)
    out = torch.zeros(len(train), dtype=torch.float64)
    for ckpt in trajectory:
        set_adapter_state(model, ckpt.adapter)
        cache = [gamma_one(model, z, ckpt, names, cfg, raw=not cfg.precondition_validation) for z in val]
        for i, z in enumerate(train):
            g = gamma_one(model, z, ckpt, names, cfg)
            out[i] += ckpt.lr * sum(float(v.to(g) @ g) for v in cache)
    return out


def score(model, trajectory, args, gen) -> dict:
    """Both scorers on the same records and trajectory, each after a one-batch warm-up;
    samples/s counts training records scored over the whole trajectory, validation cost
    included. ``rel_err`` (RMS difference over the official scores' spread) shows the two
    compute the same scores."""
    cfg = ScoreConfig(batch_size=args.batch)  # the batches are already cut to seq-len
    names = scoring_names(model, cfg)
    train_b, val_b = synthetic_batches(args.score_samples, args, gen), synthetic_batches(args.score_val, args, gen)
    batched_scores(model, train_b[:1], val_b[:1], trajectory[:1], names, cfg)
    reset_peak()
    s_batched, t_batched = timed(batched_scores, model, train_b, val_b, trajectory, names, cfg)
    peak = peak_memory()
    official_scores(model, one_by_one(train_b)[:1], one_by_one(val_b)[:1], trajectory[:1], names, cfg)
    s_official, t_official = timed(official_scores, model, train_b, val_b, trajectory, names, cfg)
    spread = float(s_official.std()) or 1.0
    rate = {"batched": args.score_samples / t_batched, "official": args.score_samples / t_official}
    return {
        "samples": args.score_samples,
        "val": args.score_val,
        "checkpoints": len(trajectory),
        "batch": args.batch,
        "scoring_dim": sum(dict(model.named_parameters())[n].numel() for n in names),
        "seconds": {"batched": t_batched, "official": t_official},
        "samples_per_s": rate,
        "batched_over_official": rate["batched"] / rate["official"],
        "batched_peak_memory_bytes": peak,
        "rel_err": float((s_batched - s_official).pow(2).mean().sqrt() / spread),
    }


def part_llama(args, deadline: float) -> dict:
    start = time.perf_counter()
    model = llama_lora(args)
    out = {
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "vocab")},
        "quantization": args.quantization,
        "params": sum(p.numel() for p in model.parameters()),
        "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "load_seconds": time.perf_counter() - start,
    }
    gen = torch.Generator().manual_seed(args.seed)
    out["train"], trajectory = train(model, args, gen)
    progress(f"  train {out['train']['samples_per_s']:.2f} samples/s, peak {gib(out['train']['peak_memory_bytes'])}")
    out["scoring"] = score(model, trajectory, args, gen)
    rate = out["scoring"]["samples_per_s"]
    progress(f"  scoring batched {rate['batched']:.2f}, batch-of-one {rate['official']:.2f} samples/s")
    return out


# --- flwr: the app under `flwr run` ------------------------------------------------------


def failed(rc: int | None, output: str, what: str, timeout: float) -> str:
    why = f"stopped at the budget after {timeout:.0f} s" if rc is None else f"exit status {rc}"
    return f"{what}: {why}\n{output[-LOG_TAIL:]}"


def part_flwr(args, deadline: float) -> dict:
    """The demo app under ``flwr run`` with the sites sharing the GPU."""
    work = args.work / "flwr"
    work.mkdir(parents=True, exist_ok=True)
    config = {"num-server-rounds": args.rounds, "trace-rounds": args.rounds, "output-dir": str(work / "runs")}
    config |= parse_set(args.set)
    config_file = write_run_config(work / "run-config.toml", config)
    federation = f"num-supernodes={args.sites} client-resources-num-gpus={args.gpu_share}"
    timeout = deadline - time.perf_counter()
    start = time.perf_counter()
    rc, output = flwr_run(ROOT, config_file, federation, work, timeout)
    wall = time.perf_counter() - start
    found = re.search(r"\[clues\] run folder: (\S+)", output)
    if rc != 0 or not found:
        raise RuntimeError(failed(rc, output, "flwr run", timeout))
    metrics = json.loads((Path(found.group(1)) / "metrics.json").read_text())
    last = metrics["rounds"][-1]
    return {
        "succeeded": not metrics["failures"],
        "wall_seconds": wall,
        "sites": args.sites,
        "gpu_share": args.gpu_share,
        "run_config": config,
        "federation_config": federation,
        "run_folder": found.group(1),
        "rounds": len(metrics["rounds"]) - 1,
        "failures": metrics["failures"],
        "final": {k: v for k, v in last.items() if isinstance(v, (int, float))},
    }


# --- scale: backbone_scale.py ------------------------------------------------------------


def part_scale(args, deadline: float) -> dict:
    out, backbones = args.work / "scale", args.work / "backbones"
    cmd = [sys.executable, str(ROOT / "simulation" / "backbone_scale.py"), "--device", args.device]
    cmd += ["--sizes", args.scale_size, "--pretrain-steps", str(args.scale_steps), "--nodes", str(args.sites)]
    cmd += ["--out", str(out), "--backbones", str(backbones), *(f"--set={kv}" for kv in args.set)]
    out.mkdir(parents=True, exist_ok=True)
    timeout = deadline - time.perf_counter()
    rc, output = run_logged(cmd, out / "backbone_scale.log", dict(os.environ), timeout)
    if rc != 0:
        raise RuntimeError(failed(rc, output, "backbone_scale", timeout))
    data = json.loads((out / "backbone_scale.json").read_text())
    row = data["rows"][0]
    return {
        "command": cmd,
        "size": row["size"],
        "pretrain_steps": args.scale_steps,
        "pretrained_here": "pretraining " in output,  # else a matching backbone under --work was reused
        "parameters": row["parameters"],
        "pretrain_loss": row["pretrain_loss"],
        "driver_seconds": data["seconds"],
        **{m: {k: row[m][k] for k in ("auroc", "best_f1", "f1")} for m in ("CLUES", "perplexity")},
    }


# --- report ------------------------------------------------------------------------------


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def environment(args) -> dict:
    versions = {}
    for dist in ("bitsandbytes", "transformers", "peft", "flwr", "ray"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **versions,
        "cpus": os.cpu_count(),
    }


def summary(name: str, r: dict) -> str:
    head = f"  {name:6} {r['status']:7} {r.get('seconds', 0):6.0f} s  "
    if r["status"] == "skipped":
        return head + r["reason"]
    if r["status"] == "error":
        return head + r["error"].strip().splitlines()[0]
    if name == "llama":
        t, s = r["train"], r["scoring"]
        return head + (
            f"train {t['samples_per_s']:.2f} samples/s, peak {gib(t['peak_memory_bytes'])}; scoring batched "
            f"{s['samples_per_s']['batched']:.2f} vs batch-of-one {s['samples_per_s']['official']:.2f} samples/s "
            f"({s['batched_over_official']:.1f}×)"
        )
    if name == "flwr":
        return head + f"{r['sites']} sites, {r['rounds']} rounds, succeeded {r['succeeded']}"
    return head + f"{r['size']}: CLUES AUROC {r['CLUES']['auroc']:.3f}, perplexity {r['perplexity']['auroc']:.3f}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first asks, and for every subprocess
    run_config(parse_set(args.set))  # unknown keys stop here, not in two parts
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible here; --device cpu runs the dry run")
    start = time.perf_counter()
    deadline = start + args.budget_s
    command = [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)]
    report = {"command": command, "env": environment(args), "budget_s": args.budget_s}
    report["parts"] = parts = {}
    runners = {"llama": part_llama, "flwr": part_flwr, "scale": part_scale}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.parts:
        elapsed = time.perf_counter() - start
        if elapsed >= args.budget_s:
            parts[name] = {"status": "skipped", "reason": f"budget spent ({elapsed:.0f} s of {args.budget_s:.0f} s)"}
        else:
            progress(f"{name}:")
            t0 = time.perf_counter()
            try:
                parts[name] = {"status": "ok", **runners[name](args, deadline)}
            except Exception as err:  # a part's failure is a result, not the end of the check
                parts[name] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
                parts[name]["traceback"] = traceback.format_exc()[-LOG_TAIL:]
            parts[name]["seconds"] = time.perf_counter() - t0
            gc.collect()  # the model's reference cycles, so that the next part's processes get its GPU memory
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        report["seconds"] = time.perf_counter() - start
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    env = report["env"]
    print(f"gpu_check on {env['gpu']} (torch {env['torch']}, CUDA {env['cuda']}), {report['seconds']:.0f} s")
    for name, r in parts.items():
        print(summary(name, r))
    print(f"written {args.out}")
    return report


if __name__ == "__main__":
    main()

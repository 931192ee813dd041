import copy
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from clues_flwr.core import trajectory
from clues_flwr.core.adapter import adapter_state
from clues_flwr.core.data import batches, collate
from clues_flwr.core.scoring import (
    ScoreConfig,
    answer_losses_of,
    left_out_scores,
    per_sample_grads,
    per_sample_loss,
    precondition,
    scores,
    scoring_mode,
    scoring_names,
    validation_sums,
)
from clues_flwr.core.threshold import anchor_threshold
from clues_flwr.core.train import TrainConfig
from clues_flwr.core.trajectory import Checkpoint
from clues_flwr.demo.dataset import demo_splits
from clues_flwr.demo.state import load_checkpoint, save_checkpoint
from clues_flwr.model import ModelSpec, build, load_tokenizer

MAX_LEN = TrainConfig().max_seq_len  # tokens per record, as a run traces, scores and tunes them


def random_lora_llama(hidden, layers, vocab, seed, dtype=torch.float64):
    """A random Llama with LoRA on q/v whose B is non-zero (B = 0 would zero A's gradient)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg).to(dtype),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
    )
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.2)
    return model


def random_batch(vocab, lengths, seed):
    """Token rows of different lengths (so padding matters), the first 40% masked as prompt."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        cut = max(1, int(0.4 * n))
        rows.append((ids, [-100] * cut + ids[cut:]))
    return collate(rows, pad_id=0)


def loop_grads(model, batch, names):
    """Reference: one sample at a time, unpadded, autograd on the loss of that sample."""
    scoring_mode(model)
    params = dict(model.named_parameters())
    out = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        ids, labels = batch["input_ids"][b : b + 1, :n], batch["labels"][b : b + 1, :n]
        loss = per_sample_loss(model(input_ids=ids.to(model.device)).logits, labels.to(model.device))[0]
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        out.append(torch.cat([g.reshape(-1).double().cpu() for g in grads]))
    return torch.stack(out)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("hidden,layers", [(32, 2), (64, 12)])
def test_batched_per_sample_grads_match_a_float64_loop(hidden, layers):
    model = random_lora_llama(hidden, layers, vocab=97, seed=hidden)
    names = scoring_names(model, ScoreConfig())
    assert len(names) == 4 and all(".layers.0." in n for n in names)
    batch = random_batch(97, [5, 17, 11, 23, 8], seed=1)
    batched = per_sample_grads(model, batch, names)
    reference = loop_grads(model, batch, names)
    err = rel_err(batched, reference)
    print(f"hidden {hidden} layers {layers}: relative error {err:.2e}")
    assert err <= 1e-12  # measured 4e-17 and 3e-17
    assert batched.abs().sum(1).min() > 0  # every sample has a non-zero gradient


def test_layer_zero_is_matched_exactly_and_other_layers_selectable():
    model = random_lora_llama(16, 12, vocab=50, seed=0)
    assert not any(".layers.10." in n or ".layers.11." in n for n in scoring_names(model, ScoreConfig(layer=0)))
    assert all(".layers.11." in n for n in scoring_names(model, ScoreConfig(layer=11)))
    assert all(".q_proj." in n for n in scoring_names(model, ScoreConfig(layer=1, modules=("q_proj",))))
    with pytest.raises(ValueError, match="no LoRA weights"):
        scoring_names(model, ScoreConfig(layer=12))


def test_answer_losses_need_only_the_logits_from_the_first_answer_on():
    model = random_lora_llama(hidden=32, layers=2, vocab=50, seed=3)
    batch = random_batch(50, [9, 17, 12, 5], seed=4)
    scoring_mode(model)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = per_sample_loss(full, batch["labels"])
    # The earliest answer token is position 2 (40% of the 5-token row), so logits from
    # position 1 on are all the loss reads, and all the output head computes.
    assert torch.equal(per_sample_loss(full[:, 1:], batch["labels"]), reference)
    assert not torch.equal(per_sample_loss(full[:, 2:], batch["labels"]), reference)
    positions = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: positions.append(args[0].shape[1]))
    losses = answer_losses_of(model, batch)
    hook.remove()
    assert positions == [batch["labels"].shape[1] - 1]
    torch.testing.assert_close(losses, reference, rtol=1e-12, atol=0)


def test_per_sample_grads_on_the_8bit_base_match_a_loop():
    model = build(ModelSpec(quantization="8bit"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    tok = load_tokenizer(":demo:")
    batch = next(batches(demo_splits(num_clients=0).test[:6], tok, 6, 96))
    names = scoring_names(model, ScoreConfig())
    err = rel_err(per_sample_grads(model, batch, names), loop_grads(model, batch, names))
    print(f"8-bit base vs single-sample loop: relative error {err:.2e}")
    # float32 on both sides; what is left is float32 reduction order over padded vs
    # unpadded rows (measured 1.5e-6). In eval mode bitsandbytes' CPU int8 kernel would
    # make this 2.4%, since it depends on the other rows of the batch: see scoring_mode.
    assert err <= 1e-5


def make_trajectory(model, names_all, seeds, lrs):
    """Checkpoints with random adapters and random positive moments for every LoRA weight."""
    params = dict(model.named_parameters())
    out = []
    for seed, lr in zip(seeds, lrs):
        g = torch.Generator().manual_seed(seed)
        adapter = {
            k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.2 for k, v in adapter_state(model).items()
        }
        m = {n: torch.randn(params[n].shape, generator=g) * 1e-3 for n in names_all}
        v = {n: torch.rand(params[n].shape, generator=g) * 1e-5 for n in names_all}
        out.append(Checkpoint(adapter=adapter, exp_avg=m, exp_avg_sq=v, step=7 + seed, lr=lr))
    return out


@pytest.fixture(scope="module")
def scored_setup():
    tok = load_tokenizer(":demo:")
    model = random_lora_llama(32, 3, vocab=len(tok), seed=5)
    splits = demo_splits(num_clients=1, pool_size=12)
    all_lora = [n for n, p in model.named_parameters() if p.requires_grad]
    ckpts = make_trajectory(model, all_lora, seeds=[1, 2, 3], lrs=[3e-3, 2e-3, 1e-3])
    return model, tok, splits.validation[:7], splits.pools[0], ckpts, all_lora


@pytest.mark.parametrize(
    "cfg",
    [ScoreConfig.paper(), ScoreConfig.official(), ScoreConfig(), ScoreConfig(precondition="sgd", cosine=False)],
    ids=["paper", "official", "default", "sgd"],
)
def test_scores_equal_the_brute_force_double_loop(scored_setup, cfg):
    model, tok, val, train, ckpts, _ = scored_setup
    cfg = ScoreConfig(**{**cfg.__dict__, "batch_size": 5})
    names = scoring_names(model, ScoreConfig())
    fast = scores(model, tok, train, ckpts, validation_sums(model, tok, val, ckpts, cfg, MAX_LEN), cfg, MAX_LEN)

    def gamma_loop(records, ckpt, raw):
        from clues_flwr.core.adapter import set_adapter_state

        set_adapter_state(model, ckpt.adapter)
        rows = []
        for r in records:
            g = loop_grads(model, next(batches([r], tok, 1, MAX_LEN)), names)
            rows.append(g if raw else precondition(g, ckpt, names, cfg))
        out = torch.cat(rows).double()
        return torch.nn.functional.normalize(out, dim=1) if cfg.cosine else out

    brute = torch.zeros(len(train), dtype=torch.float64)
    for ckpt in ckpts:
        g_train = gamma_loop(train, ckpt, raw=False)
        g_val = gamma_loop(val, ckpt, raw=not cfg.precondition_validation)
        for i in range(len(train)):
            for j in range(len(val)):
                brute[i] += ckpt.lr * float(g_val[j] @ g_train[i])
    err = rel_err(fast, brute)
    print(f"{cfg.precondition} cos={cfg.cosine}: relative error of S(z) {err:.2e}")
    assert err <= 1e-12  # measured 2e-16 to 3e-16
    # each validation record scored against the others only, as the clean reference holds it
    val_sums, left_out = left_out_scores(model, tok, val, ckpts, cfg, MAX_LEN)
    brute_out = torch.zeros(len(val), dtype=torch.float64)
    for ckpt in ckpts:
        g_rec, g_sum = gamma_loop(val, ckpt, raw=False), gamma_loop(val, ckpt, raw=not cfg.precondition_validation)
        for i in range(len(val)):
            brute_out[i] += sum(ckpt.lr * float(g_sum[j] @ g_rec[i]) for j in range(len(val)) if j != i)
    err = rel_err(left_out, brute_out)
    print(f"  left-out validation scores: relative error {err:.2e}")
    assert err <= 1e-12
    assert all(torch.equal(a, b) for a, b in zip(val_sums, validation_sums(model, tok, val, ckpts, cfg, MAX_LEN)))


def test_moments_outside_the_scoring_layer_do_not_matter(scored_setup):
    model, tok, val, train, ckpts, all_lora = scored_setup
    cfg = ScoreConfig.paper()
    base = scores(model, tok, train, ckpts, validation_sums(model, tok, val, ckpts, cfg, MAX_LEN), cfg, MAX_LEN)
    names = set(scoring_names(model, ScoreConfig()))
    others = [n for n in all_lora if n not in names]
    assert others
    perturbed = copy.deepcopy(ckpts)
    for c in perturbed:
        for n in others:
            c.exp_avg[n] = c.exp_avg[n] * 50 + 1.0
            c.exp_avg_sq[n] = c.exp_avg_sq[n] * 0 + 3.0
    again_sums = validation_sums(model, tok, val, perturbed, cfg, MAX_LEN)
    again = scores(model, tok, train, perturbed, again_sums, cfg, MAX_LEN)
    assert torch.equal(base, again)
    one = next(iter(names))
    perturbed[0].exp_avg_sq[one] = perturbed[0].exp_avg_sq[one] * 0 + 3.0
    changed_sums = validation_sums(model, tok, val, perturbed, cfg, MAX_LEN)
    changed = scores(model, tok, train, perturbed, changed_sums, cfg, MAX_LEN)
    assert not torch.allclose(base, changed)


def test_precondition_formulas_on_numbers():
    ckpt = Checkpoint(
        adapter={},
        exp_avg={"w": torch.tensor([0.1, -0.2])},
        exp_avg_sq={"w": torch.tensor([0.01, 0.04])},
        step=1,
        lr=1.0,
    )
    g = torch.tensor([[0.5, 0.5]])
    b1, b2, eps = 0.9, 0.999, 1e-8
    m = b1 * torch.tensor([0.1, -0.2]) + (1 - b1) * g
    v = b2 * torch.tensor([0.01, 0.04]) + (1 - b2) * g**2
    adam = (m / (1 - b1**2)) / ((v / (1 - b2**2)).sqrt() + eps)
    assert torch.allclose(precondition(g, ckpt, ["w"], ScoreConfig.paper()), adam)
    assert torch.allclose(precondition(g, ckpt, ["w"], ScoreConfig.official()), m / (v + eps).sqrt())
    assert torch.equal(precondition(g, ckpt, ["w"], ScoreConfig(precondition="sgd")), g)


def test_checkpoint_round_trips_and_moments_are_taken_by_name(tmp_path):
    model = build(ModelSpec(quantization="none"))
    tok = load_tokenizer(":demo:")
    records = demo_splits(num_clients=1, pool_size=32).pools[0]
    from clues_flwr.core.train import train_steps, training

    _, opt = train_steps(training(model, tok, records, TrainConfig(learning_rate=1e-3, batch_size=8), seed=0), 3)
    names = scoring_names(model, ScoreConfig())
    ckpt = trajectory.checkpoint(model, opt, names, adapter_state(model), round=2)
    params = dict(model.named_parameters())
    for n in names:
        assert torch.equal(ckpt.exp_avg[n], opt.state[params[n]]["exp_avg"])
    assert ckpt.step == 3 and ckpt.lr == 1e-3 and ckpt.round == 2
    save_checkpoint(ckpt, tmp_path / "ckpt")
    back = load_checkpoint(tmp_path / "ckpt")
    assert back.step == 3 and back.lr == 1e-3 and back.betas == (0.9, 0.999)
    for attr in ("adapter", "exp_avg", "exp_avg_sq"):
        assert all(torch.equal(getattr(back, attr)[k], v) for k, v in getattr(ckpt, attr).items())
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_checkpoint(tmp_path)


def test_threshold_rules():
    assert anchor_threshold([1.0, 2.0, 3.0, 6.0], "anchor-mean", 0.9) == 3.0
    s = list(range(1, 20))  # n = 19, r = 0.9 -> k = floor(0.1 * 20) = 2
    assert anchor_threshold(s, "anchor-quantile", 0.9) == 2.0
    assert anchor_threshold([5.0, 1.0, 3.0], "anchor-quantile", 0.9) == 1.0  # k < 1: the minimum
    with pytest.raises(ValueError, match="threshold rule"):
        anchor_threshold(s, "median", 0.9)
    with pytest.raises(ValueError, match="at least one anchor"):
        anchor_threshold([], "anchor-mean", 0.9)


def test_anchor_quantile_keeps_the_promised_recall_empirically():
    """Anchors and clean samples from one distribution: averaged over many draws, the share
    of clean samples at or above τ is at least the target recall."""
    rng = random.Random(0)
    for n, recall in [(10, 0.8), (20, 0.9), (50, 0.95)]:
        kept = []
        for _ in range(2000):
            anchors = [rng.gauss(0, 1) for _ in range(n)]
            tau = anchor_threshold(anchors, "anchor-quantile", recall)
            clean = [rng.gauss(0, 1) for _ in range(50)]
            kept.append(sum(c >= tau for c in clean) / len(clean))
        mean_kept = sum(kept) / len(kept)
        print(f"n={n} r={recall}: mean clean recall {mean_kept:.3f}")
        assert mean_kept >= recall - 0.01
    # anchor-mean keeps about half of the clean data
    anchors = [rng.gauss(0, 1) for _ in range(10)]
    clean = [rng.gauss(0, 1) for _ in range(20000)]
    tau = anchor_threshold(anchors, "anchor-mean", 0.9)
    assert 0.2 < sum(c >= tau for c in clean) / len(clean) < 0.8


def test_gamma_is_the_real_next_adamw_step_with_weight_decay():
    """θ_{t+1} − θ_t = −η Γ: Γ from the checkpoint's moments and λθ_t against the step torch's
    AdamW takes on the same one-sample gradient (float64 model, float32 adapter copy)."""
    model = random_lora_llama(hidden=32, layers=2, vocab=60, seed=11)
    names = scoring_names(model, ScoreConfig())
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for seed in range(3):  # a few real steps so that m, v and the step count are not trivial
        scoring_mode(model)
        answer_losses_of(model, random_batch(60, [9, 14, 7], seed=seed)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ckpt = trajectory.checkpoint(model, opt, names, adapter_state(model))
    assert ckpt.weight_decay == 0.1 and ckpt.step == 3
    one = random_batch(60, [13], seed=9)
    g = per_sample_grads(model, one, names)
    gamma = precondition(g, ckpt, names, ScoreConfig.paper())[0]
    before = torch.cat([params[n].detach().reshape(-1).clone() for n in names])
    scoring_mode(model)
    answer_losses_of(model, one).sum().backward()
    opt.step()
    after = torch.cat([params[n].detach().reshape(-1) for n in names])
    err = rel_err(-ckpt.lr * gamma, after - before)
    print(f"Γ vs torch's AdamW step with weight decay 0.1: relative error {err:.2e}")
    assert err <= 1e-6  # measured 2.6e-8: θ_t reaches Γ through the float32 adapter copy
    ckpt.weight_decay = 0.0  # Γ without the decay term misses the step
    assert rel_err(-ckpt.lr * precondition(g, ckpt, names, ScoreConfig.paper())[0], after - before) > 1e-4


def save_dropout_model(family: str, folder):
    """A random OPT (hidden, attention and layer dropout applied as functions of
    ``self.training``) or Llama with attention dropout, saved as a model folder whose
    vocabulary is the demo tokenizer's."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "opt":
        cfg = OPTConfig(
            vocab_size=2048,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            dropout=0.1,
            attention_dropout=0.1,
            layerdrop=0.3,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        model = OPTForCausalLM(cfg)
    else:
        cfg = LlamaConfig(
            vocab_size=2048,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=128,
            attention_dropout=0.1,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quantization", ["none", "8bit"])
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_scoring_is_deterministic_with_functional_dropout(tmp_path, family, quantization, one_thread):
    from clues_flwr.core.signals import signal_scores
    from clues_flwr.model import load_base

    base = load_base(str(save_dropout_model(family, tmp_path / family)), quantization)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    tok = load_tokenizer(":demo:")
    records = demo_splits(num_clients=0).test[:8]
    batch = next(batches(records, tok, 8, 96))
    names = scoring_names(model, ScoreConfig())
    first, second = per_sample_grads(model, batch, names), per_sample_grads(model, batch, names)
    assert first.abs().sum() > 0 and torch.equal(first, second)
    losses = [signal_scores(["perplexity", "ifd"], model, tok, records, batch_size=4, max_len=96) for _ in range(2)]
    assert all(torch.equal(losses[0][m], losses[1][m]) for m in ("perplexity", "ifd"))
    model.train()  # the same model does drop out in training, so the test can tell
    lossy = [answer_losses_of(model, batch) for _ in range(2)]
    assert not torch.equal(*lossy)

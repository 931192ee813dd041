import copy

import pytest
import torch

from clues_flwr.core.data import batches, encode, encode_answer, prompt
from clues_flwr.core.metrics import auroc
from clues_flwr.core.scoring import per_sample_loss, scoring_mode
from clues_flwr.core.signals import (
    LOSS_SIGNALS,
    METHODS,
    datainf_direction,
    datainf_scores,
    direction_from_grads,
    layer_slices,
    lora_names,
    loss_profile,
    oracle_scores,
    random_scores,
    signal_scores,
)
from clues_flwr.core.threshold import keep_top
from clues_flwr.demo.dataset import demo_splits
from clues_flwr.model import ModelSpec, build, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def demo():
    """The demo backbone with a fresh adapter (B = 0), a float64 copy whose B is random
    (so every LoRA weight has a gradient), and a half-polluted pool."""
    tok = load_tokenizer(":demo:")
    model = build(ModelSpec(quantization="none"))
    model64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(0)
    for n, p in model64.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05
    splits = demo_splits(num_clients=1, pool_size=60, pollution_ratios=(0.5,))
    return tok, model, model64, splits.validation, splits.pools[0]


def hand_token_nll(model, ids, answer) -> list[float]:
    """−log p of each token of ``answer``, the last tokens of ``ids``, from one unpadded
    forward in float64."""
    scoring_mode(model)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    start = len(ids) - len(answer)
    return [-float(logp[start + j - 1, t]) for j, t in enumerate(answer)]


def test_every_loss_signal_matches_a_float64_hand_loop_over_tokens(demo):
    """One padded, length-sorted batch per four records against one record at a time: the
    mean, end-of-answer, peak and first-token losses, s(A), and the signals built on them."""
    tok, _, model, _, pool = demo
    records = pool[:9]
    profile = loss_profile(model, tok, records, batch_size=4, max_len=96, unprompted=True)
    hand = {k: [] for k in ("mean", "end", "peak", "head", "unprompted")}
    for r in records:
        p = [tok.bos_token_id] + tok(prompt(r), add_special_tokens=False)["input_ids"]
        a = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        token = hand_token_nll(model, p + a, a)
        hand["mean"].append(sum(token) / len(token))
        hand["end"].append(token[-1])
        hand["peak"].append(max(token))
        hand["head"].append(token[0])
        alone = hand_token_nll(model, [tok.bos_token_id] + a, a)
        hand["unprompted"].append(sum(alone) / len(alone))
    hand = {k: torch.tensor(v, dtype=torch.float64) for k, v in hand.items()}
    errs = {k: rel_err(getattr(profile, k), hand[k]) for k in hand}
    print("loss profile relative errors:", {k: f"{e:.1e}" for k, e in errs.items()})
    assert profile.mean.dtype == torch.float64 and max(errs.values()) <= 1e-12  # measured 1.5e-16 to 5.8e-16
    assert not torch.equal(hand["end"], hand["mean"]) and not torch.equal(hand["peak"], hand["head"])
    scored = signal_scores(list(LOSS_SIGNALS), model, tok, records, batch_size=4, max_len=96)
    expected = {
        "perplexity": -hand["mean"],
        "end-loss": -hand["end"],
        "peak-loss": -hand["peak"],
        "head-loss": -hand["head"],
        "ifd": -hand["mean"] / hand["unprompted"],
        "ira": hand["unprompted"] - hand["mean"],  # FedDQC: s(A) − s(A|Q)
    }
    assert list(scored) == list(LOSS_SIGNALS)
    for name, want in expected.items():
        assert rel_err(scored[name], want) <= 1e-12, name
    assert loss_profile(model, tok, records, batch_size=4, max_len=96).unprompted is None, "no second pass unasked"
    alone = signal_scores(["perplexity"], model, tok, records, batch_size=4, max_len=96)
    assert torch.equal(alone["perplexity"], scored["perplexity"])


def test_answer_alone_scores_the_same_tokens_as_training_when_truncated(demo):
    tok, *_, pool = demo
    for r in pool[:10]:
        for max_len in (6, 12, 96):
            ids, labels = encode(r, tok, max_len)
            alone_ids, alone_labels = encode_answer(r, tok, max_len)
            assert [t for t in labels if t != -100] == [t for t in alone_labels if t != -100]
            assert alone_ids[0] == tok.bos_token_id and alone_labels[0] == -100 and len(ids) <= max_len


def brute_influence(hessian, val, test, slices, damping=0.1):
    """I(z_k) = −Σ_l v_lᵀ [(1/n) Σ_i (g_il g_ilᵀ + λ_l I)⁻¹] g_kl with explicit inverses."""
    v = val.mean(0)
    out = torch.zeros(len(test), dtype=torch.float64)
    for s in slices:
        g = hessian[:, s]
        d = g.shape[1]
        lam = damping * g.pow(2).sum(1).mean() / d
        if lam == 0:
            continue
        inv_mean = sum(
            torch.linalg.inv(torch.outer(gi, gi) + lam * torch.eye(d, dtype=torch.float64)) for gi in g
        ) / len(g)
        out -= test[:, s] @ (inv_mean @ v[s])
    return out


@pytest.mark.parametrize("separate_validation", [True, False])
def test_datainf_direction_equals_explicit_inverse_hessians(separate_validation):
    g = torch.Generator().manual_seed(1)
    hessian = torch.randn(7, 36, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 36, dtype=torch.float64)
    hessian[:, 30:] = 0  # a layer without gradient (lora_A while B = 0)
    val = torch.randn(5, 36, generator=g, dtype=torch.float64) if separate_validation else hessian
    test = torch.randn(4, 36, generator=g, dtype=torch.float64)
    slices = [slice(0, 12), slice(12, 30), slice(30, 36)]
    u = direction_from_grads(lambda: hessian.split(3), (lambda: val.split(2)) if separate_validation else None, slices)
    brute = brute_influence(hessian, val, test, slices)
    err = rel_err(test @ u, brute)
    print(f"DataInf u·g vs explicit inverse: relative error {err:.1e}")
    assert err <= 1e-12  # measured 9e-16 and 1.4e-15
    assert torch.equal(u[30:], torch.zeros(6, dtype=torch.float64))


def loop_grads(model, tok, records, names):
    """Reference: one record at a time, an ordinary backward of its loss."""
    scoring_mode(model)
    params = dict(model.named_parameters())
    rows = []
    for r in records:
        batch = next(batches([r], tok, 1, 96))
        loss = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
        rows.append(torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, [params[n] for n in names])]))
    return torch.stack(rows).double()


def test_datainf_on_the_demo_model_matches_a_per_sample_loop(demo):
    tok, _, model, val, pool = demo
    names = lora_names(model)
    slices = layer_slices(model, names)
    assert len(names) == 16 and [s.stop - s.start for s in slices] == [2 * 16 * 128] * 8
    train, val = pool[:6], val[:5]
    g_train, g_val = loop_grads(model, tok, train, names), loop_grads(model, tok, val, names)
    assert g_train[:, : 16 * 128].abs().sum(1).min() > 0  # lora_A has a gradient
    u = datainf_direction(model, tok, val, hessian=train, batch_size=4, max_len=96)
    u_ref = direction_from_grads(lambda: [g_train], lambda: [g_val], slices)
    scores = datainf_scores(model, tok, train, u, batch_size=4, max_len=96)
    errs = rel_err(u, u_ref), rel_err(scores, -(g_train @ u))
    print(f"DataInf on the demo model: u relative error {errs[0]:.1e}, scores {errs[1]:.1e}")
    assert max(errs) <= 1e-12  # measured 2.2e-15 and 7e-16
    public = datainf_direction(model, tok, val, batch_size=4, max_len=96)
    assert rel_err(public, direction_from_grads(lambda: [g_val], None, slices)) <= 1e-12
    with pytest.raises(ValueError, match="needs direction"):
        signal_scores(["datainf"], model, tok, train, batch_size=4, max_len=96)
    with pytest.raises(ValueError, match="entries"):
        datainf_scores(model, tok, train, u[:-1], batch_size=4, max_len=96)


def test_keep_top_counts_and_ties():
    s = [0.5, 0.9, 0.5, 0.1, 0.5]
    assert keep_top(s, 0.4).tolist() == [True, True, False, False, False]
    assert keep_top(s, 0.6).tolist() == [True, True, True, False, False]
    assert keep_top(s, 0.01).tolist() == [False, True, False, False, False]
    assert keep_top(s, 1.0).all()
    assert int(keep_top(torch.arange(100.0), 0.07).sum()) == 7  # 0.07 * 100 = 7.000000000000001
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep ratio"):
            keep_top(s, bad)
    with pytest.raises(ValueError, match="NaN"):
        keep_top([1.0, float("nan")], 0.5)


def test_oracle_and_random():
    records = [
        {"output": "a", "quality": "high"},
        {"output": "b", "quality": "low"},
        {"output": "c", "quality": "high"},
    ]
    assert oracle_scores(records).tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="record 1 has no quality label"):
        oracle_scores([records[0], {"output": "b"}])
    a, b = random_scores(50, seed=3), random_scores(50, seed=4)
    assert a.dtype == torch.float64 and torch.equal(a, random_scores(50, seed=3)) and not torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) < 1
    with pytest.raises(ValueError, match="signal must be one of"):
        signal_scores(["cherry"], None, None, records, batch_size=1, max_len=8)


def test_demo_clean_records_outrank_polluted_ones(demo):
    """At the fresh adapter, i.e. the pretrained demo backbone, on 30 clean + 30 polluted records."""
    tok, model, _, val, pool = demo
    clean = [r["quality"] == "high" for r in pool]
    direction = datainf_direction(model, tok, val[:20], batch_size=16, max_len=96)
    scored = signal_scores(METHODS, model, tok, pool, batch_size=16, max_len=96, direction=direction)
    aurocs = {m: auroc(s.tolist(), clean) for m, s in scored.items()}
    print("demo AUROC (clean vs polluted):", {m: round(a, 3) for m, a in aurocs.items()})
    # measured: perplexity 0.982, ifd 0.990, datainf 0.568, random 0.484, oracle 1.0
    assert aurocs["perplexity"] > 0.9 and aurocs["ifd"] > 0.9 and aurocs["oracle"] == 1.0


def test_combined_scores_put_signals_on_the_references_scale():
    from clues_flwr.core.combine import combine, combined, reference_of, standardise

    reference = torch.tensor([1.0, 2.0, 3.0])
    assert reference_of(reference) == (2.0, 1.0)
    assert standardise(torch.tensor([2.0, 4.0]), *reference_of(reference)).tolist() == [0.0, 2.0]
    g = torch.Generator().manual_seed(0)
    s, a = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(10, generator=g, dtype=torch.float64)
    # a site's scale and offset do not matter: a signal scaled by 7 and shifted by -3 is the same
    torch.testing.assert_close(
        standardise(7 * s - 3, *reference_of(7 * a - 3)), standardise(s, *reference_of(a)), rtol=1e-12, atol=1e-12
    )
    x, y = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 3.0, 0.25])
    assert combine([x, y], "sum").tolist() == [1.0, 1.0, 0.75]
    assert combine([x, y], "min").tolist() == [0.0, -2.0, 0.25]
    with pytest.raises(ValueError, match="combination rule"):
        combine([x], "max")
    with pytest.raises(ValueError, match="at least 2 reference"):
        reference_of(torch.tensor([1.0]))
    # fixed inputs, by hand: z = (s − mean) / spread per signal, then summed or the least
    signals = {"a": torch.tensor([4.0, 0.0]), "b": torch.tensor([10.0, 16.0])}
    stats = {"a": (2.0, 2.0), "b": (10.0, 3.0)}  # z_a = [1, −1], z_b = [0, 2]
    assert combined(signals, stats, "sum").tolist() == [1.0, 1.0]
    assert combined(signals, stats, "min").tolist() == [0.0, -1.0]
    assert combined({"a": signals["a"]}, {}, "sum").tolist() == [4.0, 0.0]  # one signal: as it is
    with pytest.raises(ValueError, match="no reference mean and spread for signal 'b'"):
        combined(signals, {"a": (0.0, 1.0)}, "sum")


def test_a_reference_that_does_not_vary_is_refused():
    """Reference scores agreeing to 1e-14 would make that signal z ≈ ±1000 and decide the sum alone."""
    from clues_flwr.core.combine import reference_of, references

    flat = torch.tensor([3.0, 3.0 + 1e-14, 3.0 - 1e-14], dtype=torch.float64)
    with pytest.raises(ValueError, match="spread .* below 1e-09 of their scale"):
        reference_of(flat)
    tiny = torch.tensor([1e-20, 2e-20, 3e-20], dtype=torch.float64)  # small, but varying: fine
    assert reference_of(tiny) == pytest.approx((2e-20, 1e-20))
    with pytest.raises(ValueError, match="not finite"):
        reference_of(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="signal 'perplexity'"):
        references({"clues": torch.tensor([0.0, 1.0, 2.0]), "perplexity": flat})

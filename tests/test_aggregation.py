import math

import pytest
import torch

from clues_flwr.core.aggregation import (
    AGGREGATIONS,
    aggregate,
    check_state,
    exact_delta,
    fedavg,
    task_arithmetic,
    ties,
)

A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------- TIES


def test_ties_hand_example():
    # density 0.5 of 6 entries keeps 3 per client; weights [1, 1, 2] -> [.25, .25, .5].
    # trim (a tie at the cut keeps the earlier entry):
    #   d1 = [ 3, -1,  .5, -4,  2, 1] -> [ 3,  0,  0, -4, 2, 0]
    #   d2 = [-2,  1,  5,  -1, -2, 4] -> [-2,  0,  5,  0, 0, 4]   (|2| at 0 and 4: entry 0 kept)
    #   d3 = [ 1, -3, -2,  .5, -1, 2] -> [ 0, -3, -2,  0, 0, 2]   (|2| at 2 and 5: both fit)
    # elected sign of .25 t1 + .25 t2 + .5 t3 = [.25, -1.5, .25, -1, .5, 2] -> [+, -, +, -, +, +]
    # disjoint mean over the agreeing clients:
    #   0: c1 -> 3 | 1: c3 -> -3 | 2: c2 (c3's -2 disagrees) -> 5 | 3: c1 -> -4 | 4: c1 -> 2
    #   (had d2 kept entry 4 instead of 0, entry 4 would elect no sign: .5 - .5 = 0 -> 0)
    #   5: c2 (.25, 4) and c3 (.5, 2) -> (1 + 1) / .75 = 8/3
    deltas = [
        {"w": t(3, -1, 0.5, -4, 2, 1)},
        {"w": t(-2, 1, 5, -1, -2, 4)},
        {"w": t(1, -3, -2, 0.5, -1, 2)},
    ]
    got = ties(deltas, [1, 1, 2], density=0.5)
    assert got["w"].dtype == torch.float32
    torch.testing.assert_close(got["w"], t(3, -3, 5, -4, 2, 8 / 3))


def test_ties_full_density_same_sign_is_weighted_mean():
    torch.manual_seed(0)
    deltas = [{"x": torch.rand(3, 4) + 0.1, "y": -torch.rand(5) - 0.1} for _ in range(3)]
    weights = [2, 5, 3]
    got = ties(deltas, weights, density=1.0)
    want = fedavg(deltas, weights)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_ties_conflicting_signs_take_the_elected_sides_disjoint_mean():
    deltas = [{"w": t(1.0, 2.0)}, {"w": t(-3.0, -2.0)}, {"w": t(2.0, 0.0)}]
    # weights [1, 1, 2] -> [.25, .25, .5]
    # entry 0: .25 - .75 + 1 = .5 > 0 -> clients 1 and 3 only: (.25*1 + .5*2) / .75 = 5/3
    # entry 1: .5 - .5 + 0 = 0 -> no sign elected -> 0
    got = ties(deltas, [1, 1, 2], density=1.0)
    torch.testing.assert_close(got["w"], t(5 / 3, 0.0))
    # the weights decide the election: [10, 1] elects +, [1, 10] elects -
    two = [{"w": t(1.0)}, {"w": t(-3.0)}]
    assert ties(two, [10, 1], 1.0)["w"].item() == 1.0
    assert ties(two, [1, 10], 1.0)["w"].item() == -3.0


def test_ties_trim_keeps_at_least_one_and_breaks_ties_by_position():
    one = [{"w": t(1, -5, 5, 2)}]
    # density .25 of 4 -> 1 entry; |-5| and |5| tie, the earlier one is kept
    torch.testing.assert_close(ties(one, [1], 0.25)["w"], t(0, -5, 0, 0))
    torch.testing.assert_close(ties(one, [1], 0.01)["w"], t(0, -5, 0, 0))
    torch.testing.assert_close(ties(one, [1], 0.5)["w"], t(0, -5, 5, 0))


def test_ties_validates_inputs():
    d = [{"w": t(1, 2)}, {"w": t(3, 4)}]
    for bad in (0, -0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ValueError, match="density must be in"):
            ties(d, [1, 1], bad)
    with pytest.raises(ValueError, match="sum to zero"):
        ties(d, [0, 0], 0.5)
    with pytest.raises(ValueError, match="one weight per state"):
        ties(d, [1], 0.5)
    with pytest.raises(ValueError, match="different keys"):
        ties([{"w": t(1, 2)}, {"v": t(1, 2)}], [1, 1], 0.5)
    with pytest.raises(ValueError, match="shape"):
        ties([{"w": t(1, 2)}, {"w": t(1, 2, 3)}], [1, 1], 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        ties(d, [2, -1], 0.5)


# ---------------------------------------------------------------- task arithmetic


def lora(a, b, bias):
    return {A: torch.tensor(a, dtype=torch.float32), B: torch.tensor(b, dtype=torch.float32), "m.bias": t(bias)}


def test_task_arithmetic_hand_example():
    # weights [9, 16] -> w = [.36, .64], sqrt(w) = [.6, .8]
    # A = .6 [1, 2] + .8 [3, -1] = [3, .4];  B = .6 [1, 0] + .8 [0, 2] = [.6, 1.6];  bias = .36 + .64*2
    c1 = lora([[1.0, 2.0]], [[1.0], [0.0]], 1.0)
    c2 = lora([[3.0, -1.0]], [[0.0], [2.0]], 2.0)
    got = task_arithmetic([c1, c2], [9, 16])
    torch.testing.assert_close(got[A], torch.tensor([[3.0, 0.4]]))
    torch.testing.assert_close(got[B], torch.tensor([[0.6], [1.6]]))
    torch.testing.assert_close(got["m.bias"], t(1.64))
    # the cross terms stay: B A = [[1.8, .24], [4.8, .64]] is not .36 B1A1 + .64 B2A2
    merged = got[B] @ got[A]
    torch.testing.assert_close(merged, torch.tensor([[1.8, 0.24], [4.8, 0.64]]))
    mean = 0.36 * c1[B] @ c1[A] + 0.64 * c2[B] @ c2[A]
    assert not torch.allclose(merged, mean, atol=0.1)


def test_task_arithmetic_weights_are_normalised():
    c1 = lora([[1.0, 2.0]], [[1.0], [0.5]], 1.0)
    c2 = lora([[3.0, -1.0]], [[0.0], [2.0]], 2.0)
    got, scaled = task_arithmetic([c1, c2], [9, 16]), task_arithmetic([c1, c2], [0.09, 0.16])
    for k in got:
        torch.testing.assert_close(got[k], scaled[k])


def test_task_arithmetic_identical_clients_scale_ba_by_squared_root_weight_sum():
    torch.manual_seed(1)
    c = {A: torch.randn(2, 5), B: torch.randn(4, 2), "m.bias": torch.randn(4)}
    ba = c[B].double() @ c[A].double()
    # one client, or all weight on one client: B A is reproduced exactly
    for states, weights in (([c], [7]), ([c, c], [1, 0])):
        got = task_arithmetic(states, weights)
        torch.testing.assert_close(got[B].double() @ got[A].double(), ba)
        torch.testing.assert_close(got["m.bias"], c["m.bias"])
    # n identical clients: B A grows by (sum sqrt(w))^2 (n for equal weights); plain keys stay
    for weights in ([1, 1, 1], [1, 2, 5]):
        got = task_arithmetic([c, c, c], weights)
        factor = sum(math.sqrt(w / sum(weights)) for w in weights) ** 2
        torch.testing.assert_close(got[B].double() @ got[A].double(), factor * ba, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["m.bias"], c["m.bias"])
    assert sum(math.sqrt(1 / 3) for _ in range(3)) ** 2 == pytest.approx(3)


# ---------------------------------------------------------------- exact


def product(state):
    return state[B].double() @ state[A].double()


def weighted_product(states, weights):
    total = sum(weights)
    return sum(w / total * product(s) for s, w in zip(states, weights))


def rank_one_client(seed):
    g = torch.Generator().manual_seed(seed)
    # B = b c^T has rank 1, so B A has rank 1 although r = 2
    b, c = torch.randn(4, 1, generator=g), torch.randn(1, 2, generator=g)
    return {A: torch.randn(2, 5, generator=g), B: b @ c, "m.bias": torch.randn(4, generator=g)}


def test_exact_reproduces_the_weighted_mean_of_products_within_rank():
    states, weights = [rank_one_client(1), rank_one_client(2)], [3, 1]
    got = exact_delta(states, weights, rank=2)
    assert got[A].shape == (2, 5) and got[B].shape == (4, 2)
    assert got[A].dtype == got[B].dtype == torch.float32
    want = weighted_product(states, weights)
    assert torch.linalg.norm(product(got) - want) / torch.linalg.norm(want) < 1e-6
    torch.testing.assert_close(got["m.bias"], fedavg(states, weights)["m.bias"])
    # B = U sqrt(S), A = sqrt(S) V^T: the factors are balanced
    torch.testing.assert_close(
        got[B].double().T @ got[B].double(), got[A].double() @ got[A].double().T, rtol=1e-5, atol=1e-5
    )


def test_exact_is_the_best_low_rank_approximation_beyond_rank():
    torch.manual_seed(3)
    states = [{A: torch.randn(2, 5), B: torch.randn(4, 2)} for _ in range(3)]
    weights = [1, 2, 3]
    want = weighted_product(states, weights)
    sv = torch.linalg.svdvals(want)
    assert sv[2] > 1e-3  # the sum really has rank > 2
    for rank in (2, 1):
        got = exact_delta(states, weights, rank=rank)
        assert got[A].shape == (2, 5) and got[B].shape == (4, 2)
        err = torch.linalg.norm(product(got) - want)
        # Eckart-Young: the Frobenius error of the best rank-k approximation is the tail's norm
        assert err.item() == pytest.approx(sv[rank:].norm().item(), rel=1e-5)
    one = exact_delta(states, weights, rank=1)
    assert torch.all(one[A][1] == 0) and torch.all(one[B][:, 1] == 0)


def test_exact_pairs_by_name_and_checks_rank():
    s = {A: torch.randn(2, 5), B: torch.randn(4, 2)}
    with pytest.raises(ValueError, match=r"m\.q_proj\.lora_A\.weight has no matching"):
        exact_delta([{A: s[A], "m.bias": torch.zeros(4)}], [1], 2)
    # pairing is by name, not by shape: q's A and k's B do not make a module
    with pytest.raises(ValueError, match="has no matching"):
        exact_delta([{A: s[A], "m.k_proj.lora_B.weight": s[B]}], [1], 2)
    with pytest.raises(ValueError, match=r"m\.q_proj\.lora_B\.weight has no matching"):
        exact_delta([{B: s[B]}], [1], 2)
    with pytest.raises(ValueError, match="rank must be in"):
        exact_delta([s], [1], 3)
    with pytest.raises(ValueError, match="rank must be in"):
        exact_delta([s], [1], 0)
    # two modules: each pairs with its own partner
    q = {A: torch.randn(2, 5), B: torch.randn(4, 2)}
    k = {"m.k_proj.lora_A.weight": torch.randn(2, 3), "m.k_proj.lora_B.weight": torch.randn(6, 2)}
    got = exact_delta([{**q, **k}], [1])
    torch.testing.assert_close(product(got), product(q), rtol=1e-5, atol=1e-5)
    kb, ka = got["m.k_proj.lora_B.weight"].double(), got["m.k_proj.lora_A.weight"].double()
    torch.testing.assert_close(
        kb @ ka, k["m.k_proj.lora_B.weight"].double() @ k["m.k_proj.lora_A.weight"].double(), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- check_state


def test_check_state_reasons():
    ref = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert check_state({"a": torch.ones(2, 3), "b": torch.ones(4)}, ref) is None
    nan, inf = torch.ones(4), torch.ones(4)
    nan[1], inf[2] = float("nan"), float("-inf")
    cases = {
        "non-finite": {"a": torch.ones(2, 3), "b": nan},
        "non-finite ": {"a": torch.ones(2, 3), "b": inf},
        "missing": {"a": torch.ones(2, 3)},
        "unexpected": {"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(1)},
        "shape": {"a": torch.ones(3, 2), "b": torch.ones(4)},
    }
    for word, state in cases.items():
        reason = check_state(state, ref)
        assert reason is not None and word.strip() in reason, (word, reason)
    assert "b" in check_state(cases["missing"], ref)


# ---------------------------------------------------------------- dispatcher


def test_aggregate_dispatches():
    torch.manual_seed(4)
    base = {A: torch.randn(2, 5), B: torch.randn(4, 2)}
    states = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    weights = [1, 2, 3]
    assert AGGREGATIONS == ("fedavg", "ties", "task-arithmetic", "exact")
    for method, want in (
        ("fedavg", fedavg(states, weights)),
        ("task-arithmetic", task_arithmetic(states, weights)),
        ("exact", exact_delta(states, weights, 2)),
    ):
        got = aggregate(method, states, weights, base=base, density=0.2)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    deltas = [{k: s[k] - base[k] for k in base} for s in states]
    got = aggregate("ties", states, weights, base=base, density=0.3)
    merged = ties(deltas, weights, 0.3)
    for k in base:
        torch.testing.assert_close(got[k], base[k] + merged[k])
    # density 1 with one client: ties returns that client
    torch.testing.assert_close(aggregate("ties", states[:1], [5], base=base, density=1.0)[A], states[0][A])


def test_aggregate_errors():
    s = [{"w": t(1, 2)}]
    with pytest.raises(ValueError, match="fedavg, ties, task-arithmetic, exact"):
        aggregate("mean", s, [1])
    with pytest.raises(ValueError, match="pass base"):
        aggregate("ties", s, [1])
    with pytest.raises(ValueError, match="does not match base"):
        aggregate("ties", s, [1], base={"w": t(1, 2, 3)}, density=0.5)
    with pytest.raises(ValueError, match="density must be in"):
        aggregate("ties", s, [1], base={"w": t(0, 0)}, density=0)

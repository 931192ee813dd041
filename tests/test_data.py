import random

import pytest

from clues_flwr.core import pollution
from clues_flwr.core.data import collate, encode, parse_ratios, per_record, prompt, split_heldout
from clues_flwr.demo.dataset import demo_records, demo_splits
from clues_flwr.model import load_tokenizer


def key(record):
    return (record["instruction"], record["input"])


def test_demo_splits_are_disjoint_and_cover_distinct_questions():
    s = demo_splits(num_clients=4, pool_size=240)
    sets = [s.pretrain, s.validation, s.anchors, s.test, *s.pools]
    keys = [{key(r) for r in part} for part in sets]
    assert [len(k) for k in keys] == [len(p) for p in sets]  # no duplicate inside a set
    for i in range(len(keys)):
        for j in range(i + 1, len(keys)):
            assert not keys[i] & keys[j], (i, j)
    assert len(s.anchors) == 10 and len(s.validation) == 50 and len(s.test) == 200
    assert [len(p) for p in s.pools] == [240] * 4


def test_demo_splits_are_deterministic_and_public_sets_ignore_client_count():
    a = demo_splits(num_clients=4, pool_size=240, seed=3)
    b = demo_splits(num_clients=4, pool_size=240, seed=3)
    assert a == b
    c = demo_splits(num_clients=2, pool_size=100, seed=3)
    assert (c.pretrain, c.validation, c.anchors, c.test) == (a.pretrain, a.validation, a.anchors, a.test)
    assert demo_splits(4, seed=4).test != a.test


def test_pollution_labels_match_records():
    clean = {key(r): r["output"] for r in demo_records()[0]}
    s = demo_splits(num_clients=4, pool_size=240, pollution_ratios=(0.8, 0.2, 0.1, 0.5))
    for pool, ratio in zip(s.pools, (0.8, 0.2, 0.1, 0.5)):
        low = [r for r in pool if r["quality"] == "low"]
        assert len(low) == round(ratio * len(pool))
        for r in pool:
            if r["quality"] == "high":
                assert r["pollution"] == "none" and r["output"] == clean[key(r)]
            else:
                assert r["pollution"] in pollution.KINDS and r["output"] != clean[key(r)]
        kinds = {r["pollution"] for r in low}
        assert kinds == set(pollution.KINDS)


def test_each_pollution_kind_damages_the_answer_its_own_way():
    rng = random.Random(0)
    rec = {"instruction": "q", "input": "", "output": "Federal Republic of Germany"}
    cut = pollution.cut(rec, rng)["output"]
    assert rec["output"].startswith(cut) and 1 <= len(cut) < len(rec["output"])
    deleted = pollution.deletion(rec, rng)["output"].split()
    assert 1 <= len(deleted) < 4 and all(w in rec["output"].split() for w in deleted)
    one_word = pollution.deletion({**rec, "output": "Deutschland"}, rng)["output"]
    assert len(one_word) < len("Deutschland")
    assert pollution.exchange(rec, rng, ["Federal Republic of Germany", "Peso"])["output"] == "Peso"
    mixed = pollution.mixed_language(rec, rng, {"Federal Republic of Germany": ("Bundesrepublik Deutschland",)})
    assert mixed["output"] == "Bundesrepublik Deutschland"
    fallback = pollution.mixed_language({**rec, "output": "DEU"}, rng, {"Japan": ("日本",)})
    assert fallback["output"] == "日本"
    noise = pollution.random_noise(rec, rng)["output"]
    assert noise != rec["output"] and len(noise) >= 3
    with pytest.raises(ValueError, match="pollution ratio"):
        pollution.pollute([rec], 1.5, seed=0, translations={})


def test_parse_ratios_names_the_setting():
    assert parse_ratios("0.8, 0.2,0.1,0.5") == [0.8, 0.2, 0.1, 0.5]
    with pytest.raises(ValueError, match="pollution: expected"):
        parse_ratios("0.8,lots")
    with pytest.raises(ValueError, match="pollution: expected"):
        parse_ratios("1.2")


def test_heldout_split_is_disjoint_and_stable():
    records = [{"instruction": str(i), "input": "", "output": "x"} for i in range(50)]
    train, held = split_heldout(records, 0.1, seed=1)
    assert len(held) == 5 and len(train) == 45
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in held)
    assert split_heldout(records, 0.1, seed=1) == (train, held)


def test_encode_masks_the_prompt_and_keeps_the_answer():
    tok = load_tokenizer(":demo:")
    rec = {"instruction": "Give the ISO 4217 code of this currency.", "input": "Euro", "output": "EUR"}
    ids, labels = encode(rec, tok, max_len=96)
    answer = tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id
    assert labels[-len(answer) :] == answer and ids[-len(answer) :] == answer
    assert all(label == -100 for label in labels[: -len(answer)])
    assert tok.decode(ids[1 : -len(answer)]) == prompt(rec)
    short_ids, short_labels = encode(rec, tok, max_len=6)
    assert len(short_ids) == 6 and short_labels[-len(answer) :] == answer
    batch = collate([encode(rec, tok, 96), (short_ids, short_labels)], tok.pad_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(ids), 6]
    assert (batch["labels"][1, 6:] == -100).all()


def test_a_record_with_its_own_prompt_is_encoded_with_it():
    tok = load_tokenizer(":demo:")
    own = {"instruction": "ignored", "prompt": "Question: 2 + 3\nAnswer: ", "output": "5"}
    ids, labels = encode(own, tok, max_len=96)
    answer = tok("5", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.decode(ids[1 : -len(answer)]) == own["prompt"] == prompt(own)
    assert labels[-len(answer) :] == answer and all(label == -100 for label in labels[: -len(answer)])


def test_per_record_keeps_record_order_and_batches_by_length():
    tok = load_tokenizer(":demo:")
    records = demo_splits(num_clients=0).test[:40]
    widths = []

    def lengths(batch):
        widths.append(batch["input_ids"].shape[1])
        return batch["attention_mask"].sum(1)

    out = per_record(lengths, records, tok, batch_size=8, max_len=96)
    assert out.tolist() == [len(encode(r, tok, 96)[0]) for r in records]
    assert len(widths) == 5 and widths == sorted(widths)
    # Sorted batches pad less than the records' own order does.
    assert sum(widths) < sum(max(out[i : i + 8].tolist()) for i in range(0, 40, 8))
    assert per_record(lengths, [], tok, batch_size=8, max_len=96).numel() == 0


def test_selection_metrics_and_auroc_against_hand_counts():
    from clues_flwr.core.metrics import auroc, confusion, selection_scores

    kept = [True, True, False, False, True]
    clean = [True, False, True, False, True]
    c = confusion(kept, clean)
    assert c == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    m = selection_scores(c)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == pytest.approx(60.0)
    assert auroc([3, 2, 1], [True, False, False]) == 1.0
    assert auroc([1, 2, 3], [True, False, False]) == 0.0
    assert auroc([1, 1, 2, 0], [True, False, True, False]) == pytest.approx(0.875)  # one tie
    rng = random.Random(0)
    s = [rng.random() for _ in range(300)]
    lab = [rng.random() < 0.4 for _ in range(300)]
    pairs = [(a > b) + 0.5 * (a == b) for a, la in zip(s, lab) if la for b, lb in zip(s, lab) if not lb]
    assert auroc(s, lab) == pytest.approx(sum(pairs) / len(pairs))


def test_best_f1_is_the_best_threshold_by_brute_force():
    from clues_flwr.core.metrics import best_f1, confusion, selection_scores

    assert best_f1([3, 2, 1], [True, False, True]) == pytest.approx(80.0)  # keep all: P 2/3, R 1
    assert best_f1([1, 1, 0], [True, False, False]) == pytest.approx(200 / 3)  # the tie goes whole
    rng = random.Random(1)
    s = [rng.randint(0, 40) for _ in range(200)]  # many ties
    lab = [rng.random() < 0.5 + x / 100 for x in s]
    brute = max(selection_scores(confusion([x >= tau for x in s], lab))["f1"] for tau in set(s))
    assert best_f1(s, lab) == pytest.approx(brute)

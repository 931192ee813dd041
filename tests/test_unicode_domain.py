"""The Unicode setting: reproducible files, a corpus that names none of the records'
characters, answers that fit the default max-seq-len, and a backbone read from a corpus."""

from __future__ import annotations

import json
import re
import unicodedata

import pytest
import torch

from clues_flwr.core.data import check_max_len, encode, pretrain_text
from clues_flwr.core.train import TrainConfig
from clues_flwr.harness import pretrain as pretrain_cli
from clues_flwr.harness import unicode_domain
from clues_flwr.harness.pretrain import pretrain, train_tokenizer
from clues_flwr.model import ModelSpec, build, load_tokenizer
from clues_flwr.sources import load_records


def subject(record: dict) -> str:
    """The character a record is about, from its input: itself, its code point or its name."""
    text = record["input"]
    if len(text) == 1:
        return text
    if re.fullmatch(r"U\+[0-9A-F]{4,6}", text):
        return chr(int(text[2:], 16))
    return unicodedata.lookup(text)


def named(text: str) -> set[str]:
    """Every character a text states: the text itself, code points, and names, alone or the
    ``+``-joined parts of a decomposition."""
    found = {text} if len(text) == 1 else set()
    found |= {chr(int(code, 16)) for code in re.findall(r"U\+([0-9A-F]{4,6})", text)}
    for part in text.split(" form of ")[-1].split(" + "):
        try:
            found.add(unicodedata.lookup(part))
        except KeyError:
            pass
    return found


@pytest.fixture(scope="module")
def setting():
    return unicode_domain.build(0)


def test_a_seed_gives_byte_identical_files_and_another_seed_other_ones(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        unicode_domain.write(tmp_path / name, seed)
    for file in ("records.jsonl", "corpus.jsonl", "info.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()
    assert (tmp_path / "a" / "records.jsonl").read_bytes() != (tmp_path / "c" / "records.jsonl").read_bytes()
    assert not list(tmp_path.glob("*/.*")), "no staging file is left behind"


def test_the_corpus_names_no_character_a_record_is_about(setting):
    records, corpus, _ = setting
    about = {subject(r) for r in records}
    named_in_corpus = {c for r in corpus for field in ("input", "output") for c in named(r[field])}
    assert named_in_corpus >= {subject(r) for r in corpus}, "the check reads every corpus subject"
    assert not about & named_in_corpus


def test_records_are_complete_varied_and_of_the_asked_sizes(setting, tmp_path):
    records, corpus, info = setting
    for r in records + corpus:
        assert set(r) == {"instruction", "input", "output"} and r["output"].strip() and r["input"]
    assert 1500 <= len(records) < 1550 and 2 * len(records) <= len(corpus) <= 3 * len(records)
    assert (info["records"], info["corpus"]) == (len(records), len(corpus))
    assert all(counts["records"] > 0 and counts["corpus"] > 0 for counts in info["relations"].values())
    phrasings = {p for options in unicode_domain.PHRASINGS.values() for p in options}
    assert {r["instruction"] for r in records} == phrasings, "every phrasing in use"
    assert sum(len(r["output"].split()) > 1 for r in records) > len(records) / 2, "mostly multi-word answers"
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)
    unicode_domain.write(tmp_path, 0)
    assert load_records(str(tmp_path / "records.jsonl")) == records, "loads without a mapping, as written"


def test_every_record_fits_the_default_max_seq_len_whole(setting):
    records, corpus, _ = setting
    tokenizer = train_tokenizer([pretrain_text(r) for r in corpus], vocab_size=2048)
    max_len = TrainConfig().max_seq_len
    check_max_len(records, tokenizer, max_len)
    assert all(len(encode(r, tokenizer, 10 * max_len)[0]) <= max_len for r in records)


def test_a_bad_out_is_refused_with_one_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        unicode_domain.main(["--out", str(tmp_path / "file")])
    assert "--out" in capsys.readouterr().err


def test_a_backbone_pretrained_on_a_corpus_loads_and_records_what_it_read(setting, tmp_path, one_thread):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in setting[1][:40]))
    out = tmp_path / "backbone"
    info = pretrain(out, 3, 4, 1e-3, seed=0, threads=1, template_share=0.25, hidden_size=32, layers=1, corpus=corpus)
    assert (info["corpus"], info["corpus_records"], info["corpus_texts"]) == (str(corpus), 40, 40)
    assert json.loads((out / "pretrain.json").read_text()) == info
    model = build(ModelSpec(name=str(out), quantization="none", seed=0))
    ids = load_tokenizer(str(out))("Name this Unicode character.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_unread_facts_has_no_meaning_with_a_corpus(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    with pytest.raises(ValueError, match="--corpus"):
        pretrain(tmp_path / "b", 1, 2, 1e-3, 0, 1, 0.0, all_facts=False, corpus=corpus)
    with pytest.raises(SystemExit):
        pretrain_cli.main(["--corpus", str(corpus), "--unread-facts", "--out", str(tmp_path / "b")])
    assert "not allowed with" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())

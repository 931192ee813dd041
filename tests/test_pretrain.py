"""The backbone builder: the corpus it reads, the shape it is asked for, a loadable result."""

from __future__ import annotations

import json

import pytest
import torch

from clues_flwr.core.scoring import ScoreConfig, scoring_names
from clues_flwr.demo.dataset import demo_records, demo_splits
from clues_flwr.harness.pretrain import pretrain
from clues_flwr.model import ModelSpec, build, load_tokenizer


@pytest.mark.parametrize("all_facts", [True, False])
def test_pretrain_writes_a_backbone_of_the_asked_shape_from_the_asked_facts(tmp_path, all_facts):
    out = tmp_path / "backbone"
    info = pretrain(
        out,
        steps=2,
        batch_size=4,
        lr=1e-3,
        seed=0,
        threads=1,
        template_share=0.25,
        hidden_size=64,
        layers=2,
        all_facts=all_facts,
    )
    read = len(demo_records()[0]) if all_facts else len(demo_splits(0).pretrain)
    assert info["corpus_texts"] == read
    assert json.loads((out / "pretrain.json").read_text()) == info
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (64, 2, 2)
    model = build(ModelSpec(name=str(out), quantization="none", seed=0))
    tok = load_tokenizer(str(out))
    assert len(scoring_names(model, ScoreConfig(layer=1))) == 4
    ids = tok("Translate this name into German.", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert not list(tmp_path.glob("tmp*")), "no staging folder is left behind"


def test_a_hidden_size_that_does_not_split_into_heads_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        pretrain(tmp_path / "b", steps=1, batch_size=2, lr=1e-3, seed=0, threads=1, template_share=0.0, hidden_size=100)
    assert not any(tmp_path.iterdir())

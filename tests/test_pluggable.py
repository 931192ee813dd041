"""Another Flower project plugs in the CLUES strategy and client handlers: its own model
(a tiny GPT-2, whose blocks are ``h.N`` and whose attention is ``c_attn``), its own data
(sums, a third of them wrong), its own ServerApp and ClientApp, as its README would show."""

from __future__ import annotations

import functools
import random

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clues_flwr.client_app import CluesClient, Site, selected_records
from clues_flwr.config import SelectionConfig, TuneConfig
from clues_flwr.data import batches
from clues_flwr.local_grid import LocalGrid
from clues_flwr.model import adapter_state, set_adapter_state
from clues_flwr.scoring import ScoreConfig, anchor_scores
from clues_flwr.strategy import CluesStrategy


def sums(n: int, seed: int, wrong: float = 0.0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(50), rng.randrange(50)
        bad = rng.random() < wrong
        answer = a + b + rng.randrange(1, 9) if bad else a + b
        out.append(
            {"instruction": "Add.", "input": f"{a} + {b}", "output": str(answer), "quality": "low" if bad else "high"}
        )
    return out


@functools.lru_cache(maxsize=1)
def tiny_gpt2():
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(
        ["### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n### Response:\n3"],
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = get_peft_model(
        GPT2LMHeadModel(config), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    return model, tok


def their_client_app(trained: list) -> ClientApp:
    """Their project: its own training handler (plain SGD, no CLUES code but the one call
    that gives the records to train on), then CLUES's handlers registered beside it."""
    app = ClientApp()

    def site(context) -> Site:
        model, tok = tiny_gpt2()
        return Site(model, tok, sums(30, seed=context.node_config["site"], wrong=0.3))

    @app.train()
    def train(msg: Message, context) -> Message:
        model, tok = tiny_gpt2()
        set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
        records = selected_records(site(context).records, msg.content["config"], context)
        trained.append((context.node_id, len(records)))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        model.train()
        for batch in batches(records, tok, 8, 48, seed=int(msg.content["config"]["server-round"])):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        content = RecordDict(
            {"arrays": ArrayRecord(adapter_state(model)), "metrics": MetricRecord({"num-examples": len(records)})}
        )
        return Message(content, reply_to=msg)

    CluesClient(site).register(app)
    return app


def test_another_project_runs_clues(capsys):
    model, tok = tiny_gpt2()
    cfg = ScoreConfig(modules=("c_attn",), batch_size=8, max_len=48)
    strategy = CluesStrategy(
        score_anchors=functools.partial(anchor_scores, model, tok, sums(12, seed=90), sums(6, seed=91), cfg=cfg),
        score_config=cfg,
        selection=SelectionConfig(trace_rounds=2),
        tune=TuneConfig(aggregation="ties"),
        fraction_evaluate=0.0,
        min_train_nodes=2,
        min_available_nodes=2,
    )
    trained = []
    grid = LocalGrid(their_client_app(trained), {7: {"site": 1}, 8: {"site": 2}}, run_config={})
    initial = ArrayRecord(adapter_state(model))
    hyper = ConfigRecord({"learning-rate": 1e-2, "local-steps": 3, "batch-size": 8, "max-seq-len": 48})
    result = strategy.start(grid, initial, num_rounds=2, train_config=hyper)

    assert len(strategy.trajectory) == 2 and all(c.lr == 1e-2 and c.step == 3 for c in strategy.trajectory)
    assert all(".h.0." in n for n in strategy.trajectory[0].exp_avg), "first-layer moments of GPT-2"
    selection = strategy.report["selection"]
    assert sorted(selection["clients"]) == ["7", "8"]
    assert sum(c["total"] for c in selection["clients"].values()) == 60
    assert sorted(result.train_metrics_clientapp) == [1, 2] and strategy.report["failures"] == []
    kept = {int(n): c["kept"] for n, c in selection["clients"].items()}
    assert sorted(trained) == sorted([(n, k) for n, k in kept.items()] * 2), "their handler tunes on what CLUES kept"
    final = result.arrays.to_torch_state_dict()
    assert any(not torch.equal(final[k], v) for k, v in initial.to_torch_state_dict().items())
    assert "[clues] score: threshold" in capsys.readouterr().out

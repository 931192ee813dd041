"""Another Flower project plugs in the CLUES strategy and client handlers: its own model
(a tiny GPT-2, whose blocks are ``h.N`` and whose attention is ``c_attn``), its own data
(sums, a third of them wrong), its own ServerApp and ClientApp, as its README would show."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
)

from clues_flwr import CluesClient, Site, selected_records
from clues_flwr.config import SelectionConfig
from clues_flwr.core.adapter import adapter_state, set_adapter_state
from clues_flwr.core.data import batches
from clues_flwr.core.scoring import ScoreConfig
from clues_flwr.core.train import TrainConfig
from clues_flwr.flower.selection import CluesSelection
from clues_flwr.flower.tuning import CluesTuning
from clues_flwr.harness.local_grid import LocalGrid

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "own-project"))
from own_project.task import sums  # noqa: E402  (the example project's arithmetic records)


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


def their_client_app(trained: list, train_mods=()) -> ClientApp:
    """Their project: its own training handler (plain SGD, no CLUES code but the one call
    that gives the records to train on), then CLUES's handlers registered beside it;
    ``train_mods`` wrap their training handler alone."""
    app = ClientApp()

    def site(context) -> Site:
        model, tok = tiny_gpt2()
        return Site(model, tok, sums(30, seed=context.node_config["site"], wrong=0.3))

    @app.train(mods=list(train_mods))
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


def selection_stage(model, tok) -> CluesSelection:
    cfg = ScoreConfig(modules=("c_attn",), batch_size=8)
    return CluesSelection.from_records(
        model,
        tok,
        sums(12, seed=90),
        sums(6, seed=91),
        score=cfg,
        selection=SelectionConfig(selection="clues+perplexity", trace_rounds=2),
        train=TrainConfig(learning_rate=1e-2, local_steps=3, batch_size=8, max_seq_len=48),
    )


def test_another_project_selects_with_clues_and_tunes_with_its_own_fedprox(caplog):
    model, tok = tiny_gpt2()
    trained = []
    grid = LocalGrid(their_client_app(trained), {7: {"site": 1}, 8: {"site": 2}}, run_config={})
    initial = ArrayRecord(adapter_state(model))
    selection = selection_stage(model, tok)
    with caplog.at_level(logging.INFO):
        report = selection.run(grid, initial)
        assert not trained, "selection alone tunes nothing"
        fedprox = FedProx(proximal_mu=0.1, fraction_evaluate=0.0)
        result = CluesTuning(fedprox, report).start(grid, initial, num_rounds=2)

    trajectory = selection.reference_scores.trajectory
    assert len(trajectory) == 2 and all(c.lr == 1e-2 and c.step == 3 for c in trajectory)
    assert all(".h.0." in n for n in trajectory[0].exp_avg), "first-layer moments of GPT-2"
    assert sorted(report.clients) == [7, 8] and sum(c["total"] for c in report.clients.values()) == 60
    assert sorted(result.train_metrics_clientapp) == [1, 2] and report.failures == []
    kept = {n: c["kept"] for n, c in report.clients.items()}
    assert sorted(trained) == sorted(list(kept.items()) * 2), "their handler tunes on what CLUES kept"
    final = result.arrays.to_torch_state_dict()
    assert any(not torch.equal(final[k], v) for k, v in initial.to_torch_state_dict().items())
    assert "[clues] score: threshold" in caplog.text and "[ROUND 2/2]" in caplog.text, "Flower's own round logs stay"


class RecordingFedAdam(FedAdam):
    """FedAdam, keeping what its own aggregate_train returned."""

    def aggregate_train(self, server_round, replies):
        self.returned = super().aggregate_train(server_round, replies)
        return self.returned


def test_fedadam_after_clues_selection_aggregates_with_fedadam():
    model, tok = tiny_gpt2()
    grid = LocalGrid(their_client_app([]), {7: {"site": 1}, 8: {"site": 2}}, run_config={})
    before = adapter_state(model)  # the stage sets the trajectory's adapters on it while it scores
    initial = ArrayRecord(adapter_state(model))
    report = selection_stage(model, tok).run(grid, initial)
    after = adapter_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "the stage leaves the caller's model as it was"
    fedadam = RecordingFedAdam(fraction_evaluate=0.0, eta=0.05)
    result = CluesTuning(fedadam, report).start(grid, initial, num_rounds=1)
    assert fedadam.m_t is not None and fedadam.v_t is not None, "FedAdam's server moments were updated"
    final, returned = result.arrays.to_torch_state_dict(), fedadam.returned[0].to_torch_state_dict()
    assert final.keys() == returned.keys() and all(torch.equal(final[k], returned[k]) for k in final)
    assert any(not torch.equal(final[k], v) for k, v in initial.to_torch_state_dict().items())


def update_norm(final: ArrayRecord, initial: ArrayRecord) -> float:
    a, b = final.to_torch_state_dict(), initial.to_torch_state_dict()
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)))


def test_flowers_dp_wrapper_composes_with_clues_tuning():
    """CluesTuning wraps Flower's server-side DP wrapper around FedAvg: CLUES screens the
    replies, DP clips each site's update (to 1e-3 here, no noise, so the bound is exact)
    and FedAvg averages, so the global update is at most the clipping norm."""
    model, tok = tiny_gpt2()
    grid = LocalGrid(their_client_app([]), {7: {"site": 1}, 8: {"site": 2}}, run_config={})
    initial = ArrayRecord(adapter_state(model))
    report = selection_stage(model, tok).run(grid, initial)
    plain = CluesTuning(FedAvg(fraction_evaluate=0.0), report).start(grid, initial, num_rounds=1)
    assert update_norm(plain.arrays, initial) > 5e-3, "unclipped, the update is larger than the norm"
    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(fraction_evaluate=0.0), noise_multiplier=0.0, clipping_norm=1e-3, num_sampled_clients=2
    )
    tuning = CluesTuning(dp, report)
    assert tuning.weighted_by_key == "num-examples" and tuning.min_train_nodes == 2, "FedAvg's, through the wrapper"
    clipped = tuning.start(grid, initial, num_rounds=1)
    assert 0 < update_norm(clipped.arrays, initial) <= 1e-3 * (1 + 1e-6)


def test_client_side_clipping_covers_the_tuning_adapters_beside_clues():
    """As docs/privacy.md shows: Flower's client-side fixed clipping (its mod on the
    project's own training handler, its wrapper around the tuning strategy) composes with
    CLUES's handlers and CluesTuning; every site's update leaves it clipped."""
    model, tok = tiny_gpt2()
    grid = LocalGrid(
        their_client_app([], train_mods=[fixedclipping_mod]), {7: {"site": 1}, 8: {"site": 2}}, run_config={}
    )
    initial = ArrayRecord(adapter_state(model))
    report = selection_stage(model, tok).run(grid, initial)
    dp = DifferentialPrivacyClientSideFixedClipping(
        FedAvg(fraction_evaluate=0.0), noise_multiplier=0.0, clipping_norm=1e-3, num_sampled_clients=2
    )
    clipped = CluesTuning(dp, report).start(grid, initial, num_rounds=1)
    assert not report.failures, report.failures
    assert 0 < update_norm(clipped.arrays, initial) <= 1e-3 * (1 + 1e-6)
    sent = [m for m in grid.replies if m.metadata.message_type == "train"]
    assert len(sent) == 2 and all(update_norm(m.content["arrays"], initial) <= 1e-3 * (1 + 1e-5) for m in sent)

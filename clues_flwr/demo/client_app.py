"""The demo's ClientApp: CLUES's handlers beside the demo's own tuning and evaluation, as any
project's ClientApp has them."""

from __future__ import annotations

import math

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clues_flwr.config import from_mapping
from clues_flwr.core.metrics import eval_loss
from clues_flwr.core.train import TrainConfig, train_steps
from clues_flwr.demo.task import demo_site, local_split, site_name
from clues_flwr.flower.client import CluesClient, selected_records, train_reply, training_loop
from clues_flwr.flower.messages import CLEAN_EXAMPLES_KEY, CLEAN_LOSS_KEY
from clues_flwr.flower.threads import threads_mod
from clues_flwr.flower.timing import timing_mod
from clues_flwr.model import ModelSpec, cached, set_adapter_state

app = ClientApp(mods=[threads_mod, timing_mod])
CluesClient(demo_site, site_name).register(app)


@app.train()
def tune(msg: Message, context: Context) -> Message:
    """The demo's own tuning round, as any project has one: train on the records the score
    phase kept. A site that kept nothing trains nothing and takes no weight."""
    cfg = msg.content["config"]
    site = demo_site(context)
    set_adapter_state(site.model, msg.content["arrays"].to_torch_state_dict())
    records = selected_records(site.records, cfg, context)
    loss = 0.0
    if records:
        hyper = from_mapping(TrainConfig, cfg)
        merge = cfg.get("mode") == "merge"  # one round of whole epochs, then a one-shot merge
        steps = math.ceil(hyper.local_epochs * len(records) / hyper.batch_size) if merge else hyper.local_steps
        losses, _ = train_steps(training_loop(site, records, cfg), steps)
        loss = sum(losses) / len(losses)
    return train_reply(msg, site, {"train-loss": loss, "num-examples": len(records)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss on the site's held-out records, which are drawn from its polluted pool: it moves
    with pollution as well as with the model. When records carry quality labels the loss
    on the clean held-out records alone goes back too, with their count (0 when unlabelled)."""
    model, tokenizer = cached(from_mapping(ModelSpec, context.run_config))
    set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    _, heldout = local_split(context)
    train = from_mapping(TrainConfig, context.run_config)
    sizes = (train.batch_size, train.max_seq_len)
    labelled = all("quality" in r for r in heldout)
    clean = [r for r in heldout if labelled and r["quality"] == "high"]
    metrics = {  # the same keys at every site, labelled or not, with held-out records or not
        "heldout-loss": eval_loss(model, tokenizer, heldout, *sizes) if heldout else 0.0,
        "num-examples": len(heldout),
        CLEAN_LOSS_KEY: eval_loss(model, tokenizer, clean, *sizes) if clean else 0.0,
        CLEAN_EXAMPLES_KEY: len(clean),
    }
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

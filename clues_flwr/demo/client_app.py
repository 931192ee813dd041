"""The demo's ClientApp: CLUES's handlers beside the demo's own tuning and evaluation, as any
project's ClientApp has them."""

from __future__ import annotations

import math

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clues_flwr.config import from_mapping
from clues_flwr.core.adapter import set_adapter_state
from clues_flwr.core.metrics import eval_loss
from clues_flwr.core.train import TrainConfig, train_steps
from clues_flwr.demo.task import demo_site, local_split
from clues_flwr.demo.threads import threads_mod
from clues_flwr.demo.timing import timing_mod
from clues_flwr.flower.client import CluesClient, evaluate_reply, selected_records, train_reply, training_loop
from clues_flwr.model import ModelSpec, cached

app = ClientApp(mods=[threads_mod, timing_mod])
CluesClient(demo_site).register(app)


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
    return train_reply(msg, context, site.model, {"train-loss": loss, "num-examples": len(records)})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss on the site's held-out records, which are drawn from its polluted pool: it moves
    with pollution as well as with the model; sent as the site's policy allows
    (``evaluate_reply``: nothing below its ``min-heldout``, clean-record figures only where
    labels may be read)."""
    model, tokenizer = cached(from_mapping(ModelSpec, context.run_config))
    set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
    _, heldout = local_split(context)
    train = from_mapping(TrainConfig, context.run_config)
    return evaluate_reply(
        msg, context, heldout, lambda records: eval_loss(model, tokenizer, records, train.batch_size, train.max_seq_len)
    )

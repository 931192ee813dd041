"""The project's ClientApp: its own training handler, and CLUES's handlers beside it."""

from __future__ import annotations

from functools import cache

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from peft import set_peft_model_state_dict

from clues_flwr import CluesClient, Site, selected_records, train_reply
from own_project.task import load_model, sums, train

app = ClientApp()


@cache
def loaded():
    """One model per process, its adapter overwritten each round (a named function, so that
    Ray can pickle the app by reference)."""
    return load_model()


def site_records(context: Context) -> list[dict]:
    """This site's records: more of them wrong at higher partition ids."""
    site = int(context.node_config["partition-id"])
    return sums(int(context.run_config["records-per-site"]), seed=site + 1, wrong=0.2 + 0.3 * site)


@app.train()
def tune(msg: Message, context: Context) -> Message:
    """Their own round: their loop, optimizer, template and FedProx term, on what CLUES kept;
    the reply through ``train_reply``, which keeps the site's own privacy policy."""
    config = msg.content["config"]
    model, tokenizer = loaded()
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    records = selected_records(site_records(context), config, context)
    loss = 0.0
    if records:
        run = context.run_config
        mu = float(config["proximal-mu"])  # FedProx's configure_train adds it
        loss = train(
            model,
            tokenizer,
            records,
            int(run["local-steps"]),
            float(run["learning-rate"]),
            mu,
            int(config["server-round"]),
        )
    return train_reply(msg, context, model, {"train-loss": loss, "num-examples": len(records)})


CluesClient(lambda context: Site(*loaded(), site_records(context))).register(app)

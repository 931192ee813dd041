"""Every decoder of the wire, fuzzed: a message with a key dropped or added, or a value made
NaN, infinite, huge, negative, fractional or of the wrong type, either decodes into values
within their bounds or raises ``Malformed``, and never anything else."""

import math
import pathlib

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from clues_flwr.core.scoring import ScoreConfig
from clues_flwr.core.train import TrainConfig
from clues_flwr.flower import protocol
from clues_flwr.flower.protocol import (
    MAX_RECORDS,
    Malformed,
    ScoreReply,
    ScoreRequest,
    ThresholdReply,
    ThresholdRequest,
    TraceReply,
    TraceRequest,
    decode_evaluate_reply,
    decode_train_reply,
)
from clues_flwr.harness.local_grid import wire

ADAPTER = {
    "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(2, 4),
    "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(4, 2),
}
PARAMS = {k.replace(".weight", ".default.weight"): v for k, v in ADAPTER.items()}
MOMENTS = ({k: torch.randn_like(v) for k, v in PARAMS.items()}, {k: torch.rand_like(v) for k, v in PARAMS.items()})
BAD = [math.nan, math.inf, -math.inf, -5, -0.5, 0.5, 10**18, 1e300, 2**62, [1, 2], [math.nan], "x", True, None]


def valid():
    """(name, a valid message, its decoder, the check of what it decoded)."""
    score = ScoreReply(10, [1, 2, 3, 4], 0, 0.0, False, 0.5, "riverside")
    threshold = ThresholdReply(3, 10, {"tp": 2, "fp": 1, "fn": 3, "tn": 4})
    trace = TraceReply(ADAPTER, 1.5, 10, 4, moments=MOMENTS)
    train = RecordDict(
        {"arrays": ArrayRecord(ADAPTER), "metrics": MetricRecord({"train-loss": 1.0, "num-examples": 7})}
    )
    evaluate = RecordDict(
        {
            "metrics": MetricRecord(
                {"heldout-loss": 1.0, "num-examples": 12, "heldout-clean-loss": 0.5, "heldout-clean-examples": 8}
            )
        }
    )
    request = ScoreRequest(
        ["perplexity", "ifd"],
        "sum",
        [0.0, 1.0, 2.0],
        "template",
        ScoreConfig(),
        96,
        {"perplexity": (0.0, 1.0), "ifd": (1.0, 2.0)},
        adapter=ADAPTER,
    )
    return {
        "score": (score.encode(), lambda c: ScoreReply.decode(c, 2), check_score),
        "threshold": (threshold.encode(), lambda c: ThresholdReply.decode(c, 10), check_threshold),
        "trace": (trace.encode(), lambda c: TraceReply.decode(c, ADAPTER), check_trace),
        "train": (train, lambda c: decode_train_reply(c, ADAPTER, "num-examples", 10), lambda w: 0 <= w <= 10),
        "evaluate": (evaluate, lambda c: decode_evaluate_reply(c, "num-examples"), lambda w: 0 <= w <= MAX_RECORDS),
        "score-request": (request.encode(), ScoreRequest.decode, check_request),
        "threshold-request": (ThresholdRequest(0.5, 0.0).encode(), ThresholdRequest.decode, check_tau),
        "trace-request": (
            TraceRequest(ADAPTER, TrainConfig(), ScoreConfig(), "trace", 3).encode(),
            TraceRequest.decode,
            lambda r: r.phase in ("trace", "trace-local") and r.server_round >= 0,
        ),
    }


def check_score(r):
    counts = [*r.histogram, r.non_finite]
    return (
        len(r.histogram) == 4
        and all(isinstance(c, int) and c >= 0 for c in counts)
        and sum(counts) == r.total <= MAX_RECORDS
        and math.isfinite(r.dp_epsilon)
        and (r.seconds is None or math.isfinite(r.seconds))
    )


def check_threshold(r):
    return 0 <= r.kept <= r.total == 10 and (r.confusion is None or sum(r.confusion.values()) == 10)


def check_trace(r):
    return r.num_examples >= 1 and all(torch.isfinite(t).all() for t in [*r.adapter.values(), *r.moments[0].values()])


def check_request(r):
    return all(math.isfinite(e) for e in r.edges) and all(s > 0 for _, s in r.references.values())


def check_tau(r):
    return (r.threshold is None or math.isfinite(r.threshold)) and 0 <= r.keep_ratio <= 1


MESSAGES = valid()


def mutated(content: RecordDict, data) -> RecordDict:
    """One record of ``content`` with one key dropped, set to a bad value, or added."""
    out = RecordDict(dict(content.items()))
    name = data.draw(st.sampled_from(sorted(out.keys())), label="record")
    record = out[name]
    if isinstance(record, ArrayRecord):
        tensors = record.to_torch_state_dict()
        key = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
        action = data.draw(st.sampled_from(["nan", "drop", "reshape"]), label="action")
        if action == "drop":
            del tensors[key]
        elif action == "nan":
            tensors[key] = (
                tensors[key].clone().flatten().index_fill(0, torch.tensor([0]), math.nan).view_as(tensors[key])
            )
        else:
            tensors[key] = tensors[key].flatten()
        out[name] = ArrayRecord(tensors)
        return out
    values = dict(record.items())
    action = data.draw(st.sampled_from(["drop", "set", "add"]), label="action")
    key = data.draw(st.sampled_from(sorted(values)), label="key") if values else "new"
    if action == "drop":
        values.pop(key, None)
    else:
        bad = data.draw(st.sampled_from(BAD), label="value")
        if bad is None:
            return out
        values["extra" if action == "add" else key] = bad
    try:
        out[name] = type(record)(values)
    except (TypeError, ValueError):  # Flower's records refuse it at the sender already
        out[name] = ConfigRecord({k: v for k, v in values.items() if not isinstance(v, list) or v})
    return out


def test_every_valid_message_decodes():
    for name, (content, decode, ok) in MESSAGES.items():
        assert ok(decode(wire(content))), name


@settings(max_examples=400, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(MESSAGES)))
def test_a_decoder_refuses_or_returns_values_within_bounds(data, name):
    content, decode, ok = MESSAGES[name]
    try:
        broken = wire(mutated(content, data))
    except (TypeError, ValueError):
        return  # not even serialisable: never reaches a decoder
    try:
        decoded = decode(broken)
    except Malformed:
        return
    assert ok(decoded), f"{name}: decoded out of bounds"


def test_no_wire_key_is_written_outside_the_protocol_module():
    """The keys that travel are written in one place; the report shows what a site sent
    through ``ScoreReply.row``."""
    package = pathlib.Path(protocol.__file__).parents[1]
    keys = ['"prompt-mismatch"', '"adam-step"', 'f"reference-', '"clues-selection"', '"score-config"', '"moments"']
    keys += ['"histogram-edges"', '"non-finite"']
    for path in package.rglob("*.py"):
        if path.name == "protocol.py":
            continue
        found = [key for key in keys if key in path.read_text()]
        assert not found, f"{path.relative_to(package)} writes the wire key(s) {found}"

import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from peft import PeftModel

from clues_flwr.config import from_mapping
from clues_flwr.core.adapter import adapter_state, set_adapter_state
from clues_flwr.core.data import batches
from clues_flwr.core.metrics import answer_accuracy, eval_loss
from clues_flwr.core.train import TrainConfig, train_steps, training
from clues_flwr.demo.dataset import demo_splits
from clues_flwr.model import ModelSpec, build, load_base, load_tokenizer

SPEC_8BIT = ModelSpec(quantization="8bit")


@pytest.fixture(scope="module")
def model8():
    return build(SPEC_8BIT), load_tokenizer(":demo:")


def logits_of(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_8bit_lora_model_trains(model8):
    model, tok = model8
    base = model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    records = demo_splits(num_clients=1, pool_size=64, pollution_ratios=(0.0,)).pools[0]
    before = eval_loss(model, tok, records, batch_size=16, max_len=96)
    frozen = base.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    losses, _ = train_steps(training(model, tok, records, TrainConfig(learning_rate=3e-3), seed=0), 12)
    after = eval_loss(model, tok, records, batch_size=16, max_len=96)
    assert after < 0.8 * before, (before, after, losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert torch.equal(frozen, base.model.layers[0].self_attn.q_proj.base_layer.weight)


def test_adapter_round_trips_through_arrayrecord(model8):
    model, tok = model8
    state = {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(model).items()}
    set_adapter_state(model, state)
    batch = next(batches(demo_splits(num_clients=0).test[:4], tok, 4, 96))
    expected = logits_of(model, batch)

    record = ArrayRecord(adapter_state(model))
    assert all(a.dtype == "float32" for a in record.values())
    wire = recorddict_to_proto(RecordDict({"arrays": record})).SerializeToString()
    received = recorddict_from_proto(ProtoRecordDict.FromString(wire))
    restored = received["arrays"].to_torch_state_dict()
    assert set(restored) == set(state)
    assert all(torch.equal(restored[k], state[k]) for k in state)

    set_adapter_state(model, {k: torch.zeros_like(v) for k, v in state.items()})
    assert not torch.allclose(logits_of(model, batch), expected)
    set_adapter_state(model, restored)
    assert torch.equal(logits_of(model, batch), expected)


def test_set_adapter_state_rejects_wrong_keys_and_shapes(model8):
    model, _ = model8
    state = adapter_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match="adapter keys differ"):
        set_adapter_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="has shape"):
        set_adapter_state(model, {**state, name: torch.zeros(3, 3)})


def test_saved_adapter_loads_with_peft(model8, tmp_path):
    model, tok = model8
    state = {k: torch.randn_like(v) * 0.05 for k, v in adapter_state(model).items()}
    set_adapter_state(model, state)
    model.save_pretrained(tmp_path / "adapter")
    batch = next(batches(demo_splits(num_clients=0).test[:4], tok, 4, 96))
    loaded = PeftModel.from_pretrained(load_base(":demo:", "8bit"), tmp_path / "adapter")
    assert torch.allclose(logits_of(loaded, batch), logits_of(model, batch), atol=1e-5)


def test_full_precision_and_accuracy_metric():
    model = build(ModelSpec(quantization="none"))
    tok = load_tokenizer(":demo:")
    assert model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.float32
    records = demo_splits(num_clients=1, pool_size=32, pollution_ratios=(0.0,)).pools[0]
    train_steps(training(model, tok, records, TrainConfig(learning_rate=1e-2), seed=0), 60)
    # After memorising 32 records, greedy answers match a good share of them, and a
    # record whose reference answer is wrong is never "matched".
    assert answer_accuracy(model, tok, records, batch_size=16, max_new_tokens=16) > 0.3
    wrong = [{**r, "output": r["output"] + " nonsense"} for r in records]
    assert answer_accuracy(model, tok, wrong, batch_size=16, max_new_tokens=16) == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal only applies without CUDA")
def test_4bit_on_cpu_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="4bit needs a CUDA GPU"):
        load_base(":demo:", "4bit")


def test_model_spec_checks_settings(tmp_path):
    cfg = {
        "model-name": ":demo:",
        "quantization": "8bit",
        "lora-r": 8,
        "lora-alpha": 16,
        "lora-dropout": 0.0,
        "lora-target-modules": "q_proj, v_proj,k_proj",
        "seed": 3,
    }
    assert from_mapping(ModelSpec, cfg).target_modules == ("q_proj", "v_proj", "k_proj")
    assert from_mapping(ModelSpec, cfg).seed == 3
    with pytest.raises(ValueError, match="quantization must be one of"):
        from_mapping(ModelSpec, {**cfg, "quantization": "int3"})
    with pytest.raises(ValueError, match="lora-target-modules must be at least one module name"):
        from_mapping(ModelSpec, {**cfg, "lora-target-modules": " , "})
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=f"model-name must be an existing model folder, got '{missing}'"):
        ModelSpec(name=missing)


def test_fedavg_weights_by_examples():
    from clues_flwr.core.aggregation import fedavg

    a = {"w": torch.tensor([1.0, 2.0])}
    b = {"w": torch.tensor([4.0, -1.0])}
    assert torch.allclose(fedavg([a, b], [1, 3])["w"], torch.tensor([3.25, -0.25]))
    with pytest.raises(ValueError, match="sum to zero"):
        fedavg([a, b], [0, 0])


def test_adapter_state_is_a_snapshot(model8):
    model, tok = model8
    before = adapter_state(model)
    first = {k: v.clone() for k, v in before.items()}
    train_steps(
        training(
            model,
            tok,
            demo_splits(num_clients=1, pool_size=16).pools[0],
            TrainConfig(learning_rate=1e-2, batch_size=8),
            0,
        ),
        2,
    )
    assert all(torch.equal(before[k], first[k]) for k in before), "training changed an earlier snapshot"
    assert any(not torch.equal(v, first[k]) for k, v in adapter_state(model).items())


def test_loading_the_8bit_model_prints_no_bitsandbytes_kernels_line():
    """bitsandbytes says on import, on a CPU with AVX-512 BF16, that an optional 4-bit kernel
    package is missing; any clues_flwr import silences it, before peft (imported here as a
    project would, after clues_flwr) brings bitsandbytes in."""
    code = (
        "import sys\n"
        "import clues_flwr.core.adapter\n"
        "import peft\n"
        "from clues_flwr.model import ModelSpec, build\n"
        "build(ModelSpec(quantization='8bit'))\n"
        "assert 'bitsandbytes' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr


def test_a_hub_model_the_machine_cannot_fetch_is_refused_at_once(monkeypatch):
    """Offline, the hub client retries for most of a minute; the check answers in one
    connection attempt, naming the setting (a closed local port stands in for the hub)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ValueError, match=r"model-name 'someone/no-such-model' .* cannot be reached"):
        load_tokenizer("someone/no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set"):
        load_base("someone/no-such-model", "none")

"""Base model (8-bit, 4-bit or full precision, on CUDA or CPU) with a fresh LoRA adapter.

Every model, the embedded demo included, loads through ``AutoModelForCausalLM``: the
demo is a regular Hugging Face model folder shipped inside the package.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch

from clues_flwr.core.adapter import adapter_state
from clues_flwr.core.checks import one_of, require

# Deprecations inside torch/transformers/peft that this app cannot act on, repeated by every Ray actor.
warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*is deprecated", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DEMO_MODEL = ":demo:"
QUANTIZATIONS = ("8bit", "4bit", "none")


DEMO_ASSET = Path("clues_flwr", "assets", "demo-model")
DEMO_DIR = Path(__file__).parent.parent / DEMO_ASSET


def demo_model_path() -> Path:
    """Folder of the embedded demo backbone (built by ``python -m clues_flwr.harness.pretrain``).

    On Flower nodes the app bundle (FAB) is imported ahead of the installed package, and a
    FAB carries code and JSON but no ``.safetensors``: the weights are then found through
    the installed distribution (its folder, or its source tree when installed editable).
    """
    candidates = [DEMO_DIR]
    try:
        dist = metadata.distribution("clues-flwr")
    except metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct.get("dir_info", {}).get("editable"):
            candidates.append(Path(url2pathname(urlparse(direct["url"]).path)) / DEMO_ASSET)
        candidates.append(Path(str(dist.locate_file(DEMO_ASSET))))
    for folder in candidates:
        if (folder / "model.safetensors").is_file():
            return folder
    raise FileNotFoundError(
        f"the embedded demo model is missing (looked in {', '.join(map(str, candidates))}): "
        "rebuild it with `python -m clues_flwr.harness.pretrain` or reinstall clues-flwr"
    )


def resolve_model_name(name: str) -> str:
    """``:demo:`` -> the embedded model folder; a hub name or local path as given."""
    return str(demo_model_path()) if name == DEMO_MODEL else name


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ModelSpec:
    """What decides the weights a client and the server build: every party must agree."""

    name: str = field(
        default=DEMO_MODEL,
        metadata={
            "key": "model-name",
            "help": "Hugging Face model name or local model folder; `:demo:` is the embedded demo model",
        },
    )
    quantization: str = field(
        default="8bit",
        metadata={
            "help": "`8bit`, `4bit` (bitsandbytes; 4-bit needs CUDA, its CPU kernels do not backpropagate) or `none`"
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (the paper: 16)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling α (the update is scaled by α / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={"key": "lora-target-modules", "help": "comma-separated names of the modules that get LoRA"},
    )
    seed: int = field(  # LoRA initialisation
        default=0, metadata={"help": "the run's seed: LoRA initialisation, data splits, pollution, shuffling"}
    )

    def __post_init__(self):
        one_of("quantization", self.quantization, QUANTIZATIONS)
        require("lora-r", self.lora_r, self.lora_r >= 1, "at least 1")
        require("lora-alpha", self.lora_alpha, self.lora_alpha > 0, "positive")
        require("lora-dropout", self.lora_dropout, 0 <= self.lora_dropout < 1, "in [0, 1)")
        require(
            "lora-target-modules",
            self.target_modules,
            bool(self.target_modules),
            "at least one module name, e.g. q_proj",
        )
        if self.name.startswith(("/", "./", "../", "~")):  # written as a path, not a hub id
            require("model-name", self.name, Path(self.name).expanduser().is_dir(), "an existing model folder")


def reachable(name: str) -> None:
    """Refuse at once a hub model this machine can neither find nor fetch: the hub client
    would otherwise retry for most of a minute on an offline machine before failing."""
    resolved = resolve_model_name(name)
    if Path(resolved).expanduser().is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(resolved, "config.json"), str):
        return  # cached: loads offline
    why = ""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        why = "HF_HUB_OFFLINE is set"
    elif not any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        hub = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((hub.hostname, hub.port or (443 if hub.scheme == "https" else 80)), 5).close()
        except OSError as err:
            why = f"the hub ({hub.netloc}) cannot be reached: {err}"
    if why:
        raise ValueError(
            f"model-name {name!r} is not a model folder here nor in the Hugging Face cache, and {why}: "
            "give a model folder, or download the model first"
        )


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    reachable(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_name(name))
    except OSError as err:
        raise ValueError(
            f"model-name {name!r} is neither a model folder here nor a model the hub serves: {err}"
        ) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(name: str, quantization: str):
    """The frozen base model; 8/4-bit through bitsandbytes on whichever device is here."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    reachable(name)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per process and model
    dev = device()
    compute = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kwargs: dict = {"device_map": {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}}
    if quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quantization == "4bit":
        if dev.type != "cuda":
            raise ValueError(
                "quantization=4bit needs a CUDA GPU: bitsandbytes' CPU 4-bit kernels have no "
                "backward, so LoRA would silently not train; use 8bit or none on CPU"
            )
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
    else:
        kwargs["dtype"] = compute
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_name(name), **kwargs)
    except OSError as err:
        raise ValueError(
            f"model-name {name!r} is neither a model folder here nor a model the hub serves: {err}"
        ) from err
    model.config.use_cache = False
    return model


def build(spec: ModelSpec):
    """Base model with a freshly initialised LoRA adapter (B = 0: the base's outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(spec.seed)
    base = load_base(spec.name, spec.quantization)
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


@lru_cache(maxsize=1)
def _loaded(spec: ModelSpec):
    model = build(spec)
    return model, load_tokenizer(spec.name), adapter_state(model)


def cached(spec: ModelSpec):
    """One model and tokenizer per process: the adapter is overwritten before each use,
    so a Ray actor or SuperNode process loads a (possibly 7B) base once, not per round."""
    model, tokenizer, _ = _loaded(spec)
    return model, tokenizer


def initial_adapter(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The adapter as built, whatever the cached model has been set to since."""
    return _loaded(spec)[2]

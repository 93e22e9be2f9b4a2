"""The PEFT model a run trains: building it (once per process), its trainable parts, seeded initial
factors, merges into the base. Base models and tokenizers come from :mod:`fedlora.model_sources`;
adapter files are :mod:`fedlora.adapter_files`.

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
import warnings
from dataclasses import dataclass

import torch

# Re-exported: callers import these from fedlora.model; each lives where its job is.
from fedlora.adapter_files import load_adapter, save_adapter, write_adapter  # noqa: F401
from fedlora.cache import BoundedCache
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.env import quiet_transformers
from fedlora.factors import (
    ADAPTER,
    SELECTOR_PREFIX,
    LoraFactors,
    ModuleFactors,
    extra_part,
    head_parameters,
    lora_layers,
    seeded_A,
)
from fedlora.model_sources import (  # noqa: F401
    BUILTIN_CONTEXT,
    HUB_IDS,
    LABELS_FILE,
    MINILM,
    TINY_BERT,
    TINY_DECODERS,
    TINY_GPT2,
    TINY_LLAMA,
    _tiny_decoder,
    cache_root,
    check_context,
    check_device,
    load_tokenizer,
    model_context,
    packaged_minilm_dir,
    portable_reference,
    resolve_model_path,
)
from fedlora.registry import model_extensions, policy_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _build_causal(cfg: FedLoraConfig, weights: bool = True) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    m = cfg.model
    dtype = _DTYPES[m.dtype]
    if m.name in TINY_DECODERS:
        base = _tiny_decoder(m.name).to(dtype)
    elif not weights:
        from transformers import AutoConfig

        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(m.name, m.cache_dir)))
    else:
        kwargs: dict = {"dtype": dtype}
        if m.quantization != "none":
            from transformers import BitsAndBytesConfig

            compute = torch.bfloat16 if m.dtype == "float32" else dtype
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=compute,
                )
                if m.quantization == "4bit"
                else BitsAndBytesConfig(load_in_8bit=True)
            )
            kwargs["device_map"] = {"": torch.cuda.current_device()}
            kwargs["dtype"] = compute
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(m.name, m.cache_dir), **kwargs)
        if m.quantization != "none":
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=m.gradient_checkpointing)
    base.config.use_cache = False  # training; generation turns its cache on per call
    if m.gradient_checkpointing and m.quantization == "none":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return base


def _build_base(cfg: FedLoraConfig, num_labels: int, weights: bool = True) -> torch.nn.Module:
    """The base model; ``weights=False``: its structure only (called under the meta device)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    # The new head is reported "MISSING" by transformers' load report before PEFT takes it over.
    quiet_transformers()
    name, cache_dir = cfg.model.name, cfg.model.cache_dir
    if cfg.model.task == "causal-lm":
        return _build_causal(cfg, weights)
    if name in TINY_DECODERS:
        raise ConfigError(f"model.name={name!r} is a decoder for model.task='causal-lm'")
    if name == TINY_BERT:
        # Random, small, same vocabulary as the packaged tokenizer: fast tests of the plumbing.
        config = BertConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
            num_labels=num_labels,
        )
        # The same random weights in every process, without resetting the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return BertForSequenceClassification(config)
    path = resolve_model_path(name, cache_dir)
    if not weights:
        from transformers import AutoConfig

        return AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path, num_labels=num_labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the new classifier's init is the same in every process
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


@dataclass
class AdapterSpec:
    """Everything that decides the shape of a client's adapter."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]  # empty: the architecture's defaults (default_targets)

    @classmethod
    def for_rank(cls, cfg: FedLoraConfig, rank: int, alpha: float | None = None) -> AdapterSpec:
        """The run's adapter at ``rank`` (alpha: the run's convention for that rank unless given)."""
        return cls(
            rank=rank,
            alpha=cfg.lora.alpha_for_rank(rank) if alpha is None else alpha,
            dropout=cfg.lora.dropout,
            target_modules=tuple(cfg.lora.target_modules),
        )


# (PEFT model, its pristine adapted base weights): evicted together, so no orphan weight copies.
_PEFT_CACHE: BoundedCache[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = BoundedCache(4)


def _cache_key(cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec, label_names: list[str] | None) -> tuple:

    extra = tuple(e.cache_key(cfg, label_names) for e in model_extensions(cfg)) or None

    m = cfg.model
    built = (
        m.task,
        m.dtype,
        m.quantization,
        m.gradient_checkpointing,
        tuple(cfg.lora.modules_to_save),
        policy_for(cfg.federation.strategy).merge_global_into_base,
    )  # the last: a pristine copy is kept
    return (m.name, num_labels, spec.rank, spec.alpha, spec.dropout, spec.target_modules, extra, built)


def build_peft_model(
    cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec, label_names: list[str] | None = None
) -> torch.nn.Module:
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
        # Only a strategy that merges updates into the base (FLoRA) changes base weights; a pristine
        # copy of the adapted weights (for a 7B model, gigabytes) is kept for it alone.
        merges = policy_for(cfg.federation.strategy).merge_global_into_base
        _PEFT_CACHE[key] = (
            model,
            {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model)} if merges else {},
        )
    else:
        model, pristine = entry
        restore_base(model, pristine)
    return model


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` on ``device``; a quantized base is placed by bitsandbytes when it is loaded."""
    if getattr(getattr(model, "base_model", model), "is_quantized", False) or _quantized(model):
        return model
    return model.to(device)


def _quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "quantization_config", None))


def skeleton_peft_model(
    cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec, label_names: list[str] | None = None
) -> torch.nn.Module:
    """The PEFT model's structure without weights (meta tensors, no memory): its module names,
    factor shapes, head shapes and LoRA config. A server that only aggregates factors
    (``federation.server_eval = false``) needs no more than this, even for a 7B model."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return _new_peft_model(cfg, num_labels, spec, label_names, weights=False)


def _new_peft_model(
    cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec, label_names: list[str] | None = None, weights: bool = True
) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    extensions = model_extensions(cfg)  # concerns that shape the model (a continual method's head, selector)
    causal = cfg.model.task == "causal-lm"
    base = _build_base(cfg, num_labels, weights)
    targets = spec.target_modules or default_targets(base, cfg.model.task)
    _check_targets(base, targets)
    if cfg.lora.modules_to_save:
        _refuse_modules_to_save(base, cfg.lora.modules_to_save, cfg.federation.wire_dtype)
    frozen_head = any([e.prepare_base(cfg, base, label_names) for e in extensions])
    task_type = TaskType.CAUSAL_LM if causal else None if frozen_head else TaskType.SEQ_CLS
    lcfg = LoraConfig(
        # Without a task type PEFT adds no modules_to_save: the frozen head stays part of the base.
        task_type=task_type,
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        fan_in_fan_out=_conv1d_targets(base, targets),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 deprecations raised inside PEFT
        model = get_peft_model(base, lcfg)
    for e in extensions:
        e.after_peft(cfg, model)
    return model


def cached_peft_model(
    cfg: FedLoraConfig, num_labels: int, spec: AdapterSpec, label_names: list[str] | None = None
) -> torch.nn.Module | None:
    """The cached PEFT model for ``spec`` as it is now (no restore), or None."""
    entry = _PEFT_CACHE.get(_cache_key(cfg, num_labels, spec, label_names))
    return None if entry is None else entry[0]


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear layer

    return (torch.nn.Linear, Conv1D)


def _linear_leaves(base: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(n, m) for n, m in base.named_modules() if isinstance(m, _linear_types())]


# Attention query/value projections by architecture, the classification default (LoRA's paper adapts W_q, W_v).
_QUERY_VALUE = (
    ("query", "value"),
    ("q_proj", "v_proj"),
    ("q_lin", "v_lin"),
    ("q", "v"),
    ("c_attn",),
    ("qkv",),
    ("query_key_value",),
    ("Wqkv",),
)


def default_targets(base: torch.nn.Module, task: str) -> tuple[str, ...]:
    """The layers LoRA adapts when ``lora.target_modules`` is empty, read from the model itself.

    causal-lm: every linear layer inside the repeated blocks (attention q/k/v/o and the MLP
    projections; QLoRA's choice), never the LM head or embeddings. classification: the attention
    query and value projections."""
    leaves = _linear_leaves(base)
    names = {n.rsplit(".", 1)[-1] for n, _ in leaves}
    if task == "causal-lm":
        out_emb = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        in_blocks = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in leaves
                if m is not out_emb and any(part.isdigit() for part in n.split("."))
            }
        )
        if in_blocks:
            return tuple(in_blocks)
    else:
        for pair in _QUERY_VALUE:
            if all(p in names for p in pair):
                return pair
    raise ConfigError(
        f"no default LoRA targets for this {task} model; set lora.target_modules to some of its "
        f"linear layers: {', '.join(sorted(names))}"
    )


def _conv1d_targets(base: torch.nn.Module, targets: tuple[str, ...]) -> bool:
    """PEFT's fan_in_fan_out: the targets are GPT-2 Conv1D layers (weights stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    hits = [m for n, m in base.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    conv = [isinstance(m, Conv1D) for m in hits]
    if any(conv) and not all(conv):
        raise ConfigError(
            "lora.target_modules mixes GPT-2 Conv1D layers with nn.Linear ones; PEFT adapts one kind "
            "per adapter (fan_in_fan_out), so target one kind"
        )
    return any(conv)


def _refuse_modules_to_save(base: torch.nn.Module, names: list[str], wire_dtype: str) -> None:
    """Whole modules on the wire: refused, with what they would cost per message."""
    # lazy: pulls in flwr, which this module does not need otherwise
    from fedlora.codec import WIRE_DTYPES

    width = torch.tensor([], dtype=WIRE_DTYPES[wire_dtype]).element_size()
    found = {n: m for n, m in base.named_modules() if any(n == t or n.endswith("." + t) for t in names)}
    if not found:
        raise ConfigError(f"invalid config value for 'lora.modules_to_save': no module named {names}")
    params = {id(p): p.numel() for m in found.values() for p in m.parameters()}
    raise ConfigError(
        f"invalid config value for 'lora.modules_to_save': {', '.join(sorted(found))} would add "
        f"{sum(params.values()) * width:,} bytes ({sum(params.values()):,} parameters in {wire_dtype}) to every "
        "message in each direction, more than LoRA factors are meant to carry; adapt them with LoRA "
        "(lora.target_modules) instead"
    )


def _check_targets(base: torch.nn.Module, targets: tuple[str, ...]) -> None:
    names = [n for n, _ in base.named_modules()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in _linear_leaves(base)})
            raise ConfigError(
                f"invalid config value for 'lora.target_modules': module {t!r} is not in the model; "
                f"its linear layers are named {', '.join(leaves)}"
            )


@torch.no_grad()
def restore_base(model: torch.nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    if not pristine:
        return
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
            A=seeded_A(seed, name, r, fan_in),
            B=torch.zeros(layer.lora_B[ADAPTER].weight.shape),
            alpha=float(layer.lora_alpha[ADAPTER]),
        )
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

    for name, p in head_parameters(model):
        on = extra_part(name) in trained_parts
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params

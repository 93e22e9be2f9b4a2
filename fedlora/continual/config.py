"""The ``[continual]`` section: a task sequence (its tasks, the method, O-LoRA's and AM-LoRA's
weights) and what it can run with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora.registry import continual_method_names
from fedlora.schema import ConfigError, _meta, _require, _require_template


@dataclass
class ContinualTask:
    """One task of a sequence: a dataset as ``[data]`` takes it, its columns, and its rounds."""

    name: str = _meta("Task name (reports and plots).", default="")
    dataset: str = _meta("Local folder/file or hub dataset, as data.dataset.", default="")
    text_column: str = _meta("Column holding the text.", default="text")
    text_pair_column: str = _meta("Optional second text column.", default="")
    label_column: str = _meta("Column holding the label.", default="label")
    instruction: str = _meta(
        "This task's cue before every input, as data.instruction ({labels}: this task's "
        "label names); '' = data.instruction.",
        default="",
    )
    rounds: int = _meta("Federated rounds spent on this task.", default=1)
    max_train_examples: int = _meta("Cap on this task's training examples (0 = data.max_train_examples).", default=0)
    max_test_examples: int = _meta("Cap on this task's held-out examples (0 = data.max_test_examples).", default=0)


CONTINUAL_METHODS = ("seq", "inclora", "olora", "amlora", "multitask")
AMLORA_ROUTERS = ("input-keys", "lora-outputs")  # fedlora.continual.mixing: KeySelector, AttentionSelector


@dataclass
class ContinualSection:
    """A sequence of tasks learned one after the other by the whole federation (see fedlora/continual)."""

    method: str = _meta(
        "'' (off), 'seq' (one LoRA trained on task after task), 'inclora' (a new LoRA per task, earlier ones "
        "frozen), 'olora' (inclora + orthogonality to earlier tasks' A), 'amlora' (inclora + an attention "
        "mixture over task LoRAs with L1 sparsity), 'multitask' (all tasks' data at once: the upper bound), "
        "or a plug-in's continual method (`fedlora methods`).",
        default="",
    )
    tasks: list[ContinualTask] = _meta(
        "The task sequence, in order ([[continual.tasks]] tables).", default_factory=list
    )
    order: list[str] = _meta(
        "The tasks' names in the order they are learned, when it differs from the tables' (every task once; "
        "e.g. O-LoRA's benchmark orders one pool of tasks three ways); [] = as listed. On load the tables are put "
        "in this order.",
        default_factory=list,
    )
    olora_lambda1: float = _meta("O-LoRA's orthogonality weight (the code's 4-task default).", default=0.5)
    olora_lambda2: float = _meta("O-LoRA's L2 weight on the new LoRA.", default=0.0)
    olora_form: str = _meta("'abs' (the code: sum of |entries|) or 'squared' (the paper).", default="abs")
    amlora_l1: float = _meta("AM-LoRA's L1 weight on the attention over task LoRAs.", default=0.01)
    amlora_router: str = _meta(
        "What AM-LoRA's attention is computed from: 'input-keys' (each task's moments of every adapted layer's "
        "pooled input, measured while the task trains; an input goes to the tasks it resembles) or 'lora-outputs' "
        "(a dense layer per task over its LoRA's output, trained on the current task only: the paper as read).",
        default="input-keys",
    )
    amlora_temperature: float = _meta(
        "The input-key router's temperature: a task's score is its mean per-feature Gaussian log-density "
        "divided by this (smaller: sharper routing).",
        default=1.0,
    )
    amlora_selector_lr: float = _meta(
        "AM-LoRA's selector's learning rate (0: train.learning_rate). The selector must leave uniform "
        "attention within a task's few local steps, which the LoRA's rate is too small for.",
        default=0.0,
    )
    head: str = _meta(
        "'label-names': a frozen head whose rows are the encoder's own features of each label name (it cannot "
        "forget; needs a linear classifier); 'trainable': the usual trained, shared head.",
        default="label-names",
    )
    head_scale: float = _meta(
        "The label-name head's logits: this times the cosine of an input's feature and a label name's (a "
        "temperature, as CLIP's); 0: the raw dot product with the unit label rows.",
        default=16.0,
    )

    @property
    def enabled(self) -> bool:
        return bool(self.method)

    def validate(self) -> None:
        if not self.method:
            return
        methods = [*CONTINUAL_METHODS, *continual_method_names()]  # built in, then the plug-ins'
        _require(
            self.method in methods,
            "continual.method",
            f"must be '' or one of {', '.join(methods)}, got {self.method!r}",
        )
        _require(len(self.tasks) >= 1, "continual.tasks", "must list at least one task")
        for i, t in enumerate(self.tasks):
            where = f"continual.tasks[{i}]"
            _require(bool(t.dataset), f"{where}.dataset", "must name a dataset")
            local = not t.dataset.startswith("builtin:") and ("/" in t.dataset or t.dataset.startswith("."))
            _require(
                not local or Path(t.dataset).expanduser().exists(), f"{where}.dataset", f"{t.dataset} does not exist"
            )
            _require(bool(t.label_column), f"{where}.label_column", "must name the label column")
            _require(bool(t.text_column), f"{where}.text_column", "must name the text column")
            _require(t.rounds >= 1, f"{where}.rounds", "must be >= 1")
            _require_template(t.instruction, f"{where}.instruction", "labels")
        names = self.task_names()
        _require(len(set(names)) == len(names), "continual.tasks", f"task names must differ, got {names}")
        if self.order:
            _require(
                sorted(self.order) == sorted(names),
                "continual.order",
                f"must name every task once ({', '.join(names)}), got {self.order}",
            )
            self.tasks = [self.tasks[names.index(n)] for n in self.order]
        _require(self.olora_form in ("abs", "squared"), "continual.olora_form", "must be 'abs' or 'squared'")
        _require(self.olora_lambda1 >= 0 and self.olora_lambda2 >= 0, "continual.olora_lambda*", "must be >= 0")
        _require(self.amlora_l1 >= 0, "continual.amlora_l1", "must be >= 0")
        _require(
            self.amlora_router in AMLORA_ROUTERS,
            "continual.amlora_router",
            f"must be one of {', '.join(AMLORA_ROUTERS)}, got {self.amlora_router!r}",
        )
        _require(self.amlora_temperature > 0, "continual.amlora_temperature", "must be > 0")
        _require(self.amlora_selector_lr >= 0, "continual.amlora_selector_lr", "must be >= 0 (0: train.learning_rate)")
        _require(self.head in ("label-names", "trainable"), "continual.head", "must be 'label-names' or 'trainable'")

    def task_names(self) -> list[str]:
        return [t.name or Path(t.dataset).name for t in self.tasks]

    def total_rounds(self) -> int:
        return sum(t.rounds for t in self.tasks)


def check_with_run(cfg, policy) -> None:
    """What a task sequence cannot run with, refused on load."""
    c, name = cfg.continual, cfg.federation.strategy
    if not c.enabled:
        return
    if "B" in policy.private:
        raise ConfigError(
            f"invalid config for 'continual.method': {name} keeps every client's B private, so the server holds "
            "no model to measure the accuracy matrix on every task with (each client would freeze its own B "
            "at a task switch; that variant is not built). Use fedit, ffa, hetlora or flexlora"
        )
    if policy.merge_global_into_base:
        raise ConfigError(
            f"invalid config for 'continual.method': {name} merges each round's global update into the base "
            "weights, so no task's LoRA stays separate to freeze or keep orthogonal. Use fedit, ffa, hetlora "
            "or flexlora"
        )
    if cfg.dylora.enabled:
        raise ConfigError(
            "invalid config for 'continual.method': DyLoRA's per-round rank and a task sequence's "
            "frozen task LoRAs do not compose (each past task would keep a different rank)"
        )
    if cfg.privacy.example_dp and (
        c.method == "amlora" or (c.method == "olora" and (c.olora_lambda1 or c.olora_lambda2))
    ):
        raise ConfigError(
            f"invalid config for 'continual.method': {c.method}'s penalty is a function of the parameters, not "
            "of each example: Opacus' per-example clipping would drop its gradient silently. Use client-level "
            "DP (privacy.client_dp) with it, or inclora with example-level DP"
        )
    if c.method == "amlora" and c.amlora_router == "input-keys" and cfg.privacy.client_dp:
        raise ConfigError(
            "invalid config for 'continual.amlora_router': the input keys are the moments of each client's "
            "inputs, sent with its update; client-level DP's clip would scale them with the factors (their norm "
            "dwarfs a LoRA update's) and its noise is calibrated to the factors. Use amlora_router = "
            "'lora-outputs' under privacy.client_dp"
        )
    if cfg.run.rounds != c.total_rounds():
        raise ConfigError(
            f"invalid config for 'run.rounds': {cfg.run.rounds} differs from the task sequence's "
            f"{c.total_rounds()} rounds (the sum of continual.tasks[*].rounds); set run.rounds = "
            f"{c.total_rounds()}"
        )

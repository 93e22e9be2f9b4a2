"""A task sequence as the core sees it, through its two registries: the model extension (the frozen
label-name head, ``continual.head = "label-names"``, and AM-LoRA's attention selector over the task
LoRAs) and the run extension :class:`Continual` (both sides of a round: see
:mod:`fedlora.extensions`). Neither the model builder nor the round protocol imports this package;
they ask the registries."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlora.continual import metrics as cmetrics
from fedlora.continual import plots
from fedlora.continual import tasks as ctasks
from fedlora.continual.client import held, method_hooks, past_tasks
from fedlora.continual.federation import (
    PAST_KEY,
    add_past_tasks,
    fresh_adapter,
    keeps_past_tasks,
    load_past,
    past_tensors,
    switch_task,
    task_lora,
    task_seed,
)
from fedlora.continual.head import install_label_name_head
from fedlora.continual.mixing import TaskLoraMixer, attach_selector
from fedlora.extensions import ClientRound, Extension, GlobalAdapter
from fedlora.factors import LoraFactors
from fedlora.lora_math import concat_rank, to_effective
from fedlora.model_sources import load_tokenizer
from fedlora.registry import register_extension, register_model_extension
from fedlora.schema import ConfigError
from fedlora.state import atomic_write_bytes, tensors_to_bytes
from fedlora.training import TrainingHook, evaluate, predict

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from fedlora.config import FedLoraConfig
    from fedlora.data import Examples
    from fedlora.partitions import ClientData
    from fedlora.strategies.round_log import RoundLog


class ContinualModel:
    """A task sequence's changes to the model: see the module docstring."""

    def applies(self, cfg: FedLoraConfig) -> bool:
        return cfg.continual.enabled

    def cache_key(self, cfg: FedLoraConfig, label_names: list[str] | None) -> tuple:
        c = cfg.continual
        return (c.method, c.amlora_router, len(c.tasks), c.head, c.head_scale, tuple(label_names or ()))

    def prepare_base(self, cfg: FedLoraConfig, base: torch.nn.Module, label_names: list[str] | None) -> bool:
        c = cfg.continual
        if c.head != "label-names":
            return False

        if label_names is None:
            raise ValueError("a frozen label-name head (continual.head) needs the run's label names")
        install_label_name_head(base, load_tokenizer(cfg.model.name, cfg.model.cache_dir), label_names, c.head_scale)
        return True

    def after_peft(self, cfg: FedLoraConfig, model: torch.nn.Module) -> None:
        if cfg.continual.method == "amlora":
            attach_selector(model, len(cfg.continual.tasks), cfg.continual.amlora_router)


register_model_extension(ContinualModel())


@register_extension
class Continual(Extension):
    """A task sequence (``continual.method``). Server: freezes each finished task's global adapter
    and starts the next task's fresh one, sends the finished tasks to each node that lacks them,
    keeps them in the checkpoint, evaluates on the current task and fills the accuracy matrix at
    every task's end, exports the task LoRAs. Client: the finished tasks' LoRAs in its forward pass,
    the method's loss terms, and how many finished tasks it holds in every reply."""

    name = "continual"
    order = 20

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self.past: list[LoraFactors] = []  # server: finished tasks' frozen factors (effective form)
        self.held: dict[int, int] = {}  # server: how many of them each node reported holding
        self._restored = 0  # finished tasks a checkpoint holds (load_server_state, then load_server_tensors)

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return cfg.continual.enabled

    # ------------------------------------------------------------------ server side
    def begin_round(self, run: GlobalAdapter, rl: RoundLog) -> None:
        switch_task(run, self.past, rl.server_round)

    def payload_key(self, node_id: int) -> Hashable:
        return self.held.get(node_id, 0) < len(self.past)

    def add_payload(self, run: GlobalAdapter, record: ArrayRecord, node_id: int) -> None:
        if self.payload_key(node_id):
            add_past_tasks(self.past, record, self.cfg.federation.wire_dtype, run.module_names)

    def reply_accepted(self, node_id: int, metrics: dict[str, Any]) -> None:
        """The finished tasks a node says it holds (bounded: a lie only costs it bytes)."""
        if PAST_KEY in metrics:
            count = metrics[PAST_KEY]
            ok = isinstance(count, (int, float)) and float(count).is_integer()
            self.held[node_id] = min(max(int(count), 0), len(self.past)) if ok else 0

    def server_state(self) -> dict:
        return {"past-tasks": len(self.past)}

    def load_server_state(self, state: dict) -> None:
        self._restored = int(state.get("past-tasks", 0))

    def server_tensors(self) -> dict[str, torch.Tensor]:
        return past_tensors(self.past)

    def load_server_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.past, rest = load_past(tensors, self._restored)
        return rest

    def label_names(self) -> list[str] | None:
        return ctasks.union_labels(self.cfg)

    def server_test_set(self, server_round: int) -> Examples | None:
        return ctasks.task_test(self.cfg, ctasks.task_of_round(self.cfg, server_round))

    def client_start(self, start: LoraFactors) -> LoraFactors:
        """Each task's fresh LoRA starts from its own seed (frozen parts such as FFA's A differ per task)."""
        if not self.past:
            return start
        fresh = fresh_adapter(start, task_seed(self.cfg, len(self.past)))
        return LoraFactors(modules=fresh.modules, extras=dict(start.extras))

    @contextmanager
    def server_evaluation(
        self, model: torch.nn.Module, server_round: int, test: Examples, device: torch.device
    ) -> Iterator[Callable[[], dict[str, Any]]]:
        with task_lora(self.cfg, model, self.past) as mixer:  # the finished tasks' LoRAs too
            yield lambda: self._accuracy_row(model, server_round, device, mixer)

    def _accuracy_row(
        self, model: torch.nn.Module, server_round: int, device: torch.device, mixer: TaskLoraMixer | None
    ) -> dict[str, Any]:
        """At a task's last round, the accuracy matrix's row for that task: every task seen so far,
        task-agnostic (an argmax over the union) and task-aware, and on the clients' validation parts;
        under AM-LoRA also its routing: per seen task, the mean attention its test inputs give the
        zero LoRA and each task's LoRA (``amlora-routing``)."""
        cfg = self.cfg
        if server_round == 0 or not ctasks.last_round_of_task(cfg, server_round):
            return {}
        k = ctasks.task_of_round(cfg, server_round)
        names = cfg.continual.task_names()
        seen = range(len(names)) if cfg.continual.method == "multitask" else range(k + 1)
        bs = cfg.train.eval_batch_size
        row: dict[str, Any] = {"continual-task": k, "continual-accuracy": {}, "continual-accuracy-task-aware": {}}
        routing = mixer is not None and mixer.mode == "attention"
        if routing:
            row["amlora-routing"] = {}
            mixer.measuring = True
        for j in seen:  # one forward pass per task serves both inference settings (and the routing)
            test_j = ctasks.task_test(cfg, j)
            if routing:
                mixer.reset_routing()
            agnostic, aware = cmetrics.accuracies(
                predict(model, test_j, bs, device), test_j.labels, ctasks.task_label_indices(cfg, j)
            )
            row["continual-accuracy"][names[j]] = agnostic
            row["continual-accuracy-task-aware"][names[j]] = aware
            if routing:
                row["amlora-routing"][names[j]] = mixer.routing()
        if routing:
            mixer.measuring = False
        if cfg.data.validation_fraction > 0:  # the same on the clients' validation parts (model selection)
            vals = {names[j]: evaluate(model, ctasks.task_validation(cfg, j), bs, device)["accuracy"] for j in seen}
            row["continual-val-accuracy"] = vals
            row["continual-val-average"] = sum(vals.values()) / len(vals)
        return row

    def evaluates_after(self, server_round: int) -> bool:
        return ctasks.last_round_of_task(self.cfg, server_round)  # the accuracy matrix's rows

    def export(self, run: GlobalAdapter, factors: LoraFactors, folder: Path) -> LoraFactors:
        if not self.past:
            return factors
        if self.cfg.continual.method in ("inclora", "olora"):
            # The task LoRAs add up: one PEFT LoRA of the summed rank holds exactly their sum.
            total = to_effective(LoraFactors(modules=factors.modules))
            for past in reversed(self.past):
                total = concat_rank(LoraFactors(modules=dict(past.modules)), total)
            return LoraFactors(
                modules={n: type(m)(A=m.A, B=m.B, alpha=float(m.rank)) for n, m in total.modules.items()},
                extras=dict(run.global_eff.extras),
            )
        # AM-LoRA: the current task's LoRA is the PEFT adapter; the finished tasks' factors and the
        # selector (which a PEFT adapter cannot express) sit beside it.
        past = {f"task{t}/{k}": v for t, p in enumerate(self.past) for k, v in p.tensors()}
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "continual_tasks.safetensors", tensors_to_bytes({**past, **run.global_eff.extras}))
        return factors

    def finish_run(self, rows: list[dict], folder: Path) -> dict[str, Any]:
        c = self.cfg.continual
        multitask = c.method == "multitask"
        cont = cmetrics.from_rows(rows, c.task_names(), multitask)
        aware = cmetrics.from_rows(rows, c.task_names(), multitask, key="continual-accuracy-task-aware")
        for found, name, what in (
            (cont, "continual.png", "task-agnostic"),
            (aware, "continual-task-aware.png", "task id known"),
        ):
            if found.get("average-accuracy") is not None and not multitask:
                plots.plot_matrix(
                    found["R"],
                    found["tasks"],
                    folder / name,
                    f"{c.method} ({what}): avg {found['average-accuracy']:.3f}, BWT {found['bwt']:+.3f}",
                )
        out = {"method": c.method, **cont, "task-aware": aware}
        stages = cmetrics.routing_stages(rows, c.task_names())
        if stages:
            out["amlora-routing"] = stages
            plots.plot_routing(stages, c.task_names(), folder / "amlora-routing.png")
        return {"continual": out}

    # ------------------------------------------------------------------ client side
    def client_data(self, partition: int, own_data: str) -> tuple[ClientData, int, int] | None:
        if own_data:
            raise ConfigError(
                "a task sequence reads each task's dataset from the run config; a device's own "
                "data per task is not supported (continual runs are simulations or partitions)"
            )
        # Declared sizes bound what a reply may claim in any task: the largest over the tasks.
        per_task = [ctasks.task_client_data(self.cfg, partition, t) for t in range(len(self.cfg.continual.tasks))]
        return per_task[0], max(len(d.train) for d in per_task), max(len(d.test) for d in per_task)

    def round_data(self, partition: int, server_round: int) -> ClientData | None:
        return ctasks.task_client_data(self.cfg, partition, ctasks.task_of_round(self.cfg, server_round))

    def adapter_seed(self, server_round: int, seed: int) -> int:
        return task_seed(self.cfg, ctasks.task_of_round(self.cfg, server_round))

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list[TrainingHook]]:
        past = past_tasks(client)
        with task_lora(client.cfg, client.model, past) as mixer:
            yield method_hooks(client.cfg, mixer, past)

    @contextmanager
    def evaluating(self, client: ClientRound) -> Iterator[None]:
        with task_lora(client.cfg, client.model, past_tasks(client)):
            yield None

    def reply_metrics(self, client: ClientRound) -> dict[str, float]:
        return {PAST_KEY: held(client)} if keeps_past_tasks(client.cfg) else {}

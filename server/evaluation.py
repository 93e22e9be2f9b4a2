"""The server's evaluation of the global adapter: on which data, after which rounds, what it
reports (the task type's metrics, the clients' validation parts, every extension's entries)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from fedlora.config import FedLoraConfig
from fedlora.data import Examples, TaskData, load_task
from fedlora.extensions import Extension, first_answer
from fedlora.partitions import server_validation
from fedlora.training import evaluate


class ServerEvaluation:
    """The run's label space and held-out data (the dataset's, or what an extension decides, such as
    a task sequence's union of labels and current task) and the metrics of one evaluation."""

    def __init__(self, cfg: FedLoraConfig, extensions: list[Extension]) -> None:
        self.cfg, self.extensions = cfg, extensions
        decided = first_answer(extensions, lambda e: e.label_names())
        self.task: TaskData | None = load_task(cfg) if decided is None else None
        self.val: Examples | None = server_validation(cfg) if decided is None else None
        self.label_names: list[str] = list(decided if decided is not None else self.task.label_names)

    def due(self, server_round: int) -> bool:
        """Whether the server evaluates after ``server_round`` (``federation.server_eval_every``):
        round 0 (the starting point), every N-th round, the last round, and every round an
        extension asks for (a task sequence: the end of every task, the accuracy matrix's rows)."""
        cfg = self.cfg
        if server_round == 0 or server_round >= cfg.run.rounds or server_round % cfg.federation.server_eval_every == 0:
            return True
        return any(e.evaluates_after(server_round) for e in self.extensions)

    def test_set(self, server_round: int) -> Examples:
        found = first_answer(self.extensions, lambda e: e.server_test_set(server_round))
        return found if found is not None else self.task.test

    def row(self, model: torch.nn.Module, server_round: int, device: torch.device) -> dict[str, Any]:
        """The metrics of the global ``model`` after ``server_round``: ``server-loss`` and, as the task
        type scores, ``server-accuracy`` / ``server-perplexity``; ``server-val-*`` on the clients'
        validation parts; then each extension's entries, all inside every extension's context."""
        bs = self.cfg.train.eval_batch_size
        test = self.test_set(server_round)
        row: dict[str, Any] = {}
        with ExitStack() as contexts:
            extra = [
                contexts.enter_context(e.server_evaluation(model, server_round, test, device)) for e in self.extensions
            ]
            res = evaluate(model, test, bs, device)
            row["server-loss"] = res["loss"]
            if "accuracy" in res:  # a causal LM on free-form instructions has loss and perplexity only
                row["server-accuracy"] = res["accuracy"]
            if "perplexity" in res:
                row["server-perplexity"] = res["perplexity"]
                row["server-unparsed"] = res.get("unparsed")
            if self.val is not None:
                vres = evaluate(model, self.val, bs, device)
                row["server-val-accuracy"] = vres.get("accuracy")
                row["server-val-loss"] = vres["loss"]
            for entries in extra:
                row.update(entries())
        return row

    def baselines(self) -> dict[str, float]:
        """What accuracy means on the held-out set: chance and, for a labelled test split, the majority class."""
        if self.task is not None and self.task.num_labels:
            return accuracy_baselines(self.task.test.labels, self.task.num_labels)
        return {"chance": 1.0 / len(self.label_names)} if self.label_names else {}


def accuracy_baselines(labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    """What accuracy means on this held-out set: chance (uniform guess) and the majority class."""
    counts = torch.bincount(labels, minlength=num_labels)
    return {"chance": 1.0 / num_labels, "majority class": float(counts.max()) / max(int(counts.sum()), 1)}

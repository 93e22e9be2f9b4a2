"""Continual-learning figures from the accuracy matrix R.

``R[i][j]`` is the accuracy on task j's test set after training on task i (rows: tasks learned so
far; only j <= i are measured). With T tasks:

* average accuracy = mean_j R[T-1][j]
* backward transfer BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])      (negative: forgetting)
* forgetting = mean_{j < T-1} (max_{i < T-1} R[i][j] - R[T-1][j])   (Chaudhry et al. 2018)
"""

from __future__ import annotations

import math

import torch


def accuracies(logits: torch.Tensor, labels: torch.Tensor, task_labels: list[int]) -> tuple[float, float]:
    """(task-agnostic, task-aware) accuracy of one task's predictions over the union label space.

    Task-agnostic: the argmax over every label of every task (O-LoRA's setting, the default).
    Task-aware (task-incremental learning: the task id is known at test time): the argmax over the
    task's own labels only, so confusing one task's inputs with another task's labels costs nothing
    and what remains is forgetting within the task."""
    if len(labels) == 0:
        return 0.0, 0.0
    agnostic = (logits.argmax(-1) == labels).float().mean().item()
    allowed = torch.as_tensor(task_labels, dtype=torch.long)
    aware = allowed[logits[:, allowed].argmax(-1)]
    return agnostic, (aware == labels).float().mean().item()


def _check(R: list[list[float | None]]) -> int:
    T = len(R)
    for i, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"R must be square: row {i} has {len(row)} entries, not {T}")
        for j in range(i + 1):
            if row[j] is None or not math.isfinite(row[j]):
                raise ValueError(f"R[{i}][{j}] (task {j} after task {i}) is missing")
    return T


def average_accuracy(R: list[list[float | None]]) -> float:
    T = _check(R)
    return sum(R[T - 1][j] for j in range(T)) / T


def backward_transfer(R: list[list[float | None]]) -> float:
    T = _check(R)
    if T < 2:
        return 0.0
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(R: list[list[float | None]]) -> float:
    T = _check(R)
    if T < 2:
        return 0.0
    return sum(max(R[i][j] for i in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)


def summary(R: list[list[float | None]], tasks: list[str]) -> dict:
    return {
        "tasks": list(tasks),
        "R": R,
        "average-accuracy": average_accuracy(R),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
    }


def from_rows(rows: list[dict], tasks: list[str], multitask: bool = False, key: str = "continual-accuracy") -> dict:
    """The continual summary from a run's metrics rows (``continual-task`` and ``key``: the task-agnostic
    ``continual-accuracy`` or ``continual-accuracy-task-aware``).

    Multi-task training has one evaluation (all tasks, at the end): average accuracy only."""
    measured = [r for r in rows if r.get(key)]
    if multitask:
        last = measured[-1][key] if measured else {}
        accs = [last.get(t) for t in tasks]
        avg = sum(accs) / len(accs) if accs and None not in accs else None
        return {"tasks": list(tasks), "R": [accs], "average-accuracy": avg, "bwt": None, "forgetting": None}
    T = len(tasks)
    R: list[list[float | None]] = [[None] * T for _ in range(T)]
    for r in measured:
        i = int(r["continual-task"])
        for j, t in enumerate(tasks):
            if t in r[key]:
                R[i][j] = float(r[key][t])
    try:
        return summary(R, tasks)
    except ValueError as exc:  # an unfinished run: report what there is
        return {
            "tasks": list(tasks),
            "R": R,
            "average-accuracy": None,
            "bwt": None,
            "forgetting": None,
            "incomplete": str(exc),
        }


def routing_stages(rows: list[dict], tasks: list[str]) -> list[dict]:
    """AM-LoRA's routing after each task, from the metrics rows: per stage, the task that ended and,
    per seen task, the mean attention its test inputs give the zero LoRA and each task's LoRA."""
    return [
        {"after": tasks[r["continual-task"]], "routing": r["amlora-routing"]} for r in rows if r.get("amlora-routing")
    ]

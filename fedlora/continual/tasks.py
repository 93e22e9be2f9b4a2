"""A task sequence over the run's rounds, with one label space for all tasks.

Inference is task-agnostic (as in O-LoRA's benchmark): the label space is the union of the tasks'
label names in task order (amazon and yelp share theirs), and every task's labels are mapped into
it. Each task's data is read and partitioned exactly as a run's ``[data]`` is (the task's dataset
and columns replace those of ``[data]``; every other data setting is the run's), so each task has
its own Dirichlet split over the same clients. Clients move to the next task together.
"""

from __future__ import annotations

import torch

from fedlora.cache import BoundedCache
from fedlora.config import FedLoraConfig
from fedlora.data import Examples, load_task
from fedlora.partitions import ClientData, client_data, server_validation

_TASK_CFG: BoundedCache[FedLoraConfig] = BoundedCache(16)


def task_config(cfg: FedLoraConfig, index: int) -> FedLoraConfig:
    """The run's config with task ``index``'s dataset and columns in ``[data]`` (continual off)."""
    key = f"{cfg.digest()}/{index}"
    if key in _TASK_CFG:
        return _TASK_CFG[key]
    t = cfg.continual.tasks[index]
    raw = cfg.to_dict()
    raw["data"].update(
        dataset=t.dataset,
        data_files={},
        text_column=t.text_column,
        label_column=t.label_column,
        text_pair_column=t.text_pair_column,
        instruction=t.instruction or cfg.data.instruction,
    )
    if t.max_train_examples:
        raw["data"]["max_train_examples"] = t.max_train_examples
    if t.max_test_examples:
        raw["data"]["max_test_examples"] = t.max_test_examples
    raw["continual"] = {"method": ""}
    raw["run"]["rounds"] = max(1, t.rounds)
    out = FedLoraConfig.from_dict(raw)
    _TASK_CFG[key] = out
    return out


def union_labels(cfg: FedLoraConfig) -> list[str]:
    names: list[str] = []
    for i in range(len(cfg.continual.tasks)):
        for n in load_task(task_config(cfg, i)).label_names:
            if n not in names:
                names.append(n)
    return names


def _remap(ex: Examples | None, names: list[str], union: list[str]) -> Examples | None:
    if ex is None:
        return None
    index = torch.tensor([union.index(n) for n in names], dtype=torch.long)
    return Examples(ex.input_ids, index[ex.labels] if len(ex) else ex.labels, task=ex.task)


def task_of_round(cfg: FedLoraConfig, server_round: int) -> int:
    """The task trained in ``server_round`` (round 0, before training, counts as the first task's)."""
    if cfg.continual.method == "multitask":
        return 0
    end = 0
    for i, t in enumerate(cfg.continual.tasks):
        end += t.rounds
        if server_round <= end:
            return i
    return len(cfg.continual.tasks) - 1


def last_round_of_task(cfg: FedLoraConfig, server_round: int) -> bool:
    if cfg.continual.method == "multitask":
        return server_round == cfg.run.rounds
    end = 0
    for t in cfg.continual.tasks:
        end += t.rounds
        if server_round == end:
            return True
    return False


def task_client_data(cfg: FedLoraConfig, partition: int, index: int) -> ClientData:
    """Client ``partition``'s split of task ``index`` (every task, for multi-task training)."""
    union = union_labels(cfg)
    indices = range(len(cfg.continual.tasks)) if cfg.continual.method == "multitask" else [index]
    parts = []
    for i in indices:
        tc = task_config(cfg, i)
        names = load_task(tc).label_names
        d = client_data(tc, partition)
        parts.append(
            ClientData(
                train=_remap(d.train, names, union), test=_remap(d.test, names, union), val=_remap(d.val, names, union)
            )
        )
    if len(parts) == 1:
        return parts[0]
    vals = [p.val for p in parts if p.val is not None]
    return ClientData(
        train=Examples.concat([p.train for p in parts]),
        test=Examples.concat([p.test for p in parts]),
        val=Examples.concat(vals) if vals else None,
    )


def task_validation(cfg: FedLoraConfig, index: int) -> Examples | None:
    """Task ``index``'s validation parts of every client (``data.validation_fraction``), in the union
    label space: what hyper-parameters are chosen on."""

    tc = task_config(cfg, index)
    return _remap(server_validation(tc), load_task(tc).label_names, union_labels(cfg))


def task_label_indices(cfg: FedLoraConfig, index: int) -> list[int]:
    """Task ``index``'s own labels as positions in the union label space (task-aware inference)."""
    union = union_labels(cfg)
    return [union.index(n) for n in load_task(task_config(cfg, index)).label_names]


def task_test(cfg: FedLoraConfig, index: int) -> Examples:
    """Task ``index``'s held-out set in the union label space (the server's R matrix reads it)."""
    tc = task_config(cfg, index)
    task = load_task(tc)
    return _remap(task.test, task.label_names, union_labels(cfg))

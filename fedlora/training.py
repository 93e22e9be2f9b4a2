"""The local training step and evaluation: plain PyTorch, shared by clients, server and benchmarks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlora.config import TrainConfig
from fedlora.data import Examples, batches


def pick_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    seconds: float


def make_optimizer(params: list[torch.nn.Parameter], tc: TrainConfig) -> torch.optim.Optimizer:
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.learning_rate, momentum=tc.momentum, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)


def train_local(model: torch.nn.Module, params: list[torch.nn.Parameter], data: Examples, tc: TrainConfig,
                seed: int, device: torch.device) -> TrainResult:
    """``local_steps`` steps (or ``local_epochs`` epochs) of the task loss on ``data``.

    Deterministic given ``seed``: dropout draws from the process's global RNG, which virtual
    clients sharing a worker process would otherwise advance for each other (a client's result
    would depend on who trained before it there); it is seeded here and restored afterwards.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train(model, params, data, tc, seed, device)


def _train(model: torch.nn.Module, params: list[torch.nn.Parameter], data: Examples, tc: TrainConfig,
           seed: int, device: torch.device) -> TrainResult:
    t0 = time.perf_counter()
    model.train()
    opt = make_optimizer(params, tc)
    total_loss, seen, steps, epoch = 0.0, 0, 0, 0
    target_steps = tc.local_steps or tc.local_epochs * math.ceil(len(data) / tc.batch_size)
    while steps < target_steps:
        for batch, labels in batches(data, tc.batch_size, shuffle=True, seed=seed * 7919 + epoch):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = labels.to(device)
            logits = model(**batch).logits
            loss = F.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            opt.step()
            total_loss += float(loss.detach()) * len(labels)
            seen += len(labels)
            steps += 1
            if steps >= target_steps:
                break
        epoch += 1
    if not math.isfinite(total_loss):
        raise FloatingPointError("local training diverged (non-finite loss)")
    return TrainResult(loss=total_loss / max(seen, 1), num_examples=len(data), steps=steps,
                       seconds=time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Examples, batch_size: int, device: torch.device) -> dict[str, float]:
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for batch, labels in batches(data, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = labels.to(device)
        logits = model(**batch).logits
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        n += len(labels)
    return {"loss": loss / max(n, 1), "accuracy": correct / max(n, 1), "num-examples": n}


@torch.no_grad()
def predict(model: torch.nn.Module, data: Examples, batch_size: int, device: torch.device) -> torch.Tensor:
    model.eval()
    out = [model(**{k: v.to(device) for k, v in b.items()}).logits.cpu() for b, _ in batches(data, batch_size, False)]
    return torch.cat(out)

"""The one local training loop and evaluation: plain PyTorch, shared by clients, server and benchmarks.

Everything that changes how a step is taken plugs into this loop as a :class:`TrainingHook`
(example-level DP-SGD wraps the model, optimizer and batches; continual-learning regularisers add
to the loss; other task types bring their own loss) instead of growing a second loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedlora.config import TrainConfig
from fedlora.data import Examples, batches
from fedlora.registry import task_of


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
    metrics: dict = field(default_factory=dict)  # what hooks report (e.g. DP-SGD's epsilon)


def make_optimizer(params: list[torch.nn.Parameter] | list[dict], tc: TrainConfig) -> torch.optim.Optimizer:
    """``tc``'s optimizer over ``params``, or over parameter groups (dicts, as torch takes them: a group
    without its own ``lr`` gets ``tc.learning_rate``)."""
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.learning_rate, momentum=tc.momentum, weight_decay=tc.weight_decay)
    return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def cross_entropy_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.logits, labels)


def task_loss_for(data: Examples) -> Callable:
    """The loss of the examples' task: next-token cross-entropy on the response tokens of causal-LM
    examples, cross-entropy over classes otherwise."""
    return task_of(data).loss


@dataclass
class TrainContext:
    """What a hook may read and replace before the loop starts."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    data: Examples
    tc: TrainConfig
    seed: int
    device: torch.device
    target_steps: int
    batch_source: Callable[[int], Iterable[Batch | None]]  # epoch -> batches (None: an empty batch)
    task_loss: Callable = cross_entropy_loss
    clip_grad: bool = True  # the loop's own global-norm clip (off under per-sample clipping)


class TrainingHook:
    """An extension point of the training loop; every method is optional."""

    def begin(self, ctx: TrainContext) -> None:
        """Before the first step: may replace ``ctx.model``, ``ctx.optimizer``, ``ctx.batch_source``."""

    def loss(self, ctx: TrainContext, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimise, given the task loss of this batch (add regularisers here)."""
        return loss

    def empty_batch(self, ctx: TrainContext) -> None:
        """A step whose batch is empty (Poisson sampling on a small client)."""

    def end(self, ctx: TrainContext) -> dict:
        """After the last step: metrics to report."""
        return {}

    def close(self, ctx: TrainContext) -> None:
        """Always called last, also when training failed: undo what ``begin`` did to shared objects."""


def train_local(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    data: Examples,
    tc: TrainConfig,
    seed: int,
    device: torch.device,
    hooks: Sequence[TrainingHook] = (),
) -> TrainResult:
    """``local_steps`` steps (or ``local_epochs`` epochs) of the task loss on ``data``.

    Deterministic given ``seed``: dropout draws from the process's global RNG, which virtual
    clients sharing a worker process would otherwise advance for each other (a client's result
    would depend on who trained before it there); it is seeded here and restored afterwards.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train(model, params, data, tc, seed, device, hooks)


def _train(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    data: Examples,
    tc: TrainConfig,
    seed: int,
    device: torch.device,
    hooks: Sequence[TrainingHook],
) -> TrainResult:
    t0 = time.perf_counter()
    model.train()
    ctx = TrainContext(
        model=model,
        params=params,
        optimizer=make_optimizer(params, tc),
        data=data,
        tc=tc,
        seed=seed,
        device=device,
        target_steps=tc.local_steps or tc.local_epochs * math.ceil(len(data) / tc.batch_size),
        batch_source=lambda epoch: batches(data, tc.batch_size, shuffle=True, seed=seed * 7919 + epoch),
        task_loss=task_loss_for(data),
        clip_grad=tc.max_grad_norm > 0,
    )
    try:
        for h in hooks:
            h.begin(ctx)
        return _loop(ctx, hooks, t0)
    finally:
        for h in hooks:
            h.close(ctx)


def _loop(ctx: TrainContext, hooks: Sequence[TrainingHook], t0: float) -> TrainResult:
    tc, device, data = ctx.tc, ctx.device, ctx.data
    # The running loss stays on the device: reading it every step would wait for the device every step.
    total_loss, seen, steps, epoch = torch.zeros((), device=device), 0, 0, 0
    while steps < ctx.target_steps:
        for item in ctx.batch_source(epoch):
            if item is None:
                for h in hooks:
                    h.empty_batch(ctx)
            else:
                batch, labels = item
                batch = {k: v.to(device) for k, v in batch.items()}
                labels = labels.to(device)
                loss = ctx.task_loss(ctx.model(**batch), labels)
                for h in hooks:
                    loss = h.loss(ctx, loss)
                ctx.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if ctx.clip_grad:
                    torch.nn.utils.clip_grad_norm_(ctx.params, tc.max_grad_norm)
                ctx.optimizer.step()
                total_loss += loss.detach() * len(labels)
                seen += len(labels)
            steps += 1
            if steps >= ctx.target_steps:
                break
        epoch += 1
    total_loss = float(total_loss)
    if not math.isfinite(total_loss):
        raise FloatingPointError("local training diverged (non-finite loss)")
    metrics: dict = {}
    for h in hooks:
        metrics.update(h.end(ctx))
    return TrainResult(
        loss=total_loss / max(seen, 1),
        num_examples=len(data),
        steps=steps,
        seconds=time.perf_counter() - t0,
        metrics=metrics,
    )


def evaluate(model: torch.nn.Module, data: Examples, batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss (and accuracy, and what else the examples' task type scores) on ``data``: the task type's
    own evaluation (:mod:`fedlora.registry`)."""
    return task_of(data).evaluate(model, data, batch_size, device)


@torch.no_grad()
def predict(model: torch.nn.Module, data: Examples, batch_size: int, device: torch.device) -> torch.Tensor:
    model.eval()
    out = [model(**{k: v.to(device) for k, v in b.items()}).logits.cpu() for b, _ in batches(data, batch_size, False)]
    return torch.cat(out)

"""EWC's Fisher estimate and penalty on fedlora's training loop (see :mod:`fedlora.methods.ewc`)."""

from __future__ import annotations

import logging

import torch

from fedlora.continual.tasks import task_client_data, task_of_round
from fedlora.data import Examples, batches
from fedlora.extensions import ClientRound
from fedlora.training import TrainContext, TrainingHook, task_loss_for

log = logging.getLogger("fedlora.client")


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The model's trainable parameters by name (the LoRA factors a continual client trains)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def diagonal_fisher(
    model: torch.nn.Module, data: Examples, limit: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Mean over the first ``limit`` examples of ``data`` of the squared gradient of each example's
    loss (its negative log-likelihood) w.r.t. every trainable parameter; dropout off, model restored."""
    params = trainable(model)
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    loss_of = task_loss_for(data)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch, labels in batches(data, 1, shuffle=False):
            if seen >= limit:
                break
            model.zero_grad(set_to_none=True)
            loss = loss_of(model(**{k: v.to(device) for k, v in batch.items()}), labels.to(device))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.detach() ** 2
            seen += 1
    finally:
        model.train(was_training)
    return {n: f / max(seen, 1) for n, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], anchors: list[dict[str, dict[str, torch.Tensor]]]) -> torch.Tensor:
    """sum over finished tasks j and parameters i of F_j,i * (theta_i - theta*_j,i)^2 (without weight/2)."""
    total = torch.zeros((), dtype=torch.float32, device=next(iter(params.values())).device)
    for a in anchors:
        for n, p in params.items():
            total = total + (a["fisher"][n] * (p - a["theta"][n]) ** 2).sum()
    return total


class EWCPenalty(TrainingHook):
    """loss + weight/2 * :func:`ewc_penalty` over the finished tasks' (theta*, F)."""

    def __init__(self, weight: float, anchors: list[dict[str, dict[str, torch.Tensor]]]) -> None:
        self.weight, self.anchors = weight, anchors
        self.last = 0.0

    def begin(self, ctx: TrainContext) -> None:
        self.params = trainable(ctx.model)
        self.anchors = [{k: {n: t.to(ctx.device) for n, t in v.items()} for k, v in a.items()} for a in self.anchors]
        for a in self.anchors:
            if set(a["theta"]) != set(self.params):
                raise ValueError("EWC: the stored task parameters do not match the model's trainable parameters")

    def loss(self, ctx: TrainContext, loss: torch.Tensor) -> torch.Tensor:
        pen = ewc_penalty(self.params, self.anchors)
        self.last = pen.detach()
        return loss + 0.5 * self.weight * pen

    def end(self, ctx: TrainContext) -> dict:
        return {"ewc-penalty": float(self.last)}


def _state_name(client: ClientRound, task: int) -> str:
    return f"ewc-{client.cfg.digest()}-task{task}"


def fisher_penalty(client: ClientRound, weight: float, fisher_examples: int) -> list[TrainingHook]:
    """The round's EWC hook: the finished tasks' (theta*, F) from the store, the one that just ended
    estimated now (the received model is its theta*) when the client does not hold it yet."""
    task = task_of_round(client.cfg, client.server_round)
    if task == 0:
        return []
    last = task - 1
    if not client.store.has(client.client_id, _state_name(client, last)):
        theta = {n: p.detach().clone().cpu() for n, p in trainable(client.model).items()}
        prev = task_client_data(client.cfg, client.partition_id, last).train
        fisher = {n: f.cpu() for n, f in diagonal_fisher(client.model, prev, fisher_examples, client.device).items()}
        client.store.save(
            client.client_id,
            _state_name(client, last),
            {**{f"theta/{n}": t for n, t in theta.items()}, **{f"fisher/{n}": f for n, f in fisher.items()}},
        )
    anchors = []
    for j in range(task):
        kept = client.store.load(client.client_id, _state_name(client, j))
        if kept is None:  # the client took part in no round of task j+1 before this one's task
            log.info(
                "client %s: EWC holds no parameters of finished task %d (it trained in none of the rounds "
                "after it ended); that task is not protected",
                client.client_id,
                j,
            )
            continue
        anchors.append(
            {
                "theta": {k[6:]: v for k, v in kept.items() if k.startswith("theta/")},
                "fisher": {k[7:]: v for k, v in kept.items() if k.startswith("fisher/")},
            }
        )
    return [EWCPenalty(weight, anchors)] if anchors else []

"""LwF's distillation on fedlora's training loop (see :mod:`fedlora.methods.lwf`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedlora.continual.tasks import task_label_indices, task_of_round
from fedlora.extensions import ClientRound
from fedlora.training import TrainContext, TrainingHook


def distillation_loss(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(softmax(old / T) || softmax(logits / T))."""
    t = temperature
    old = F.log_softmax(old_logits.float() / t, dim=-1)
    new = F.log_softmax(logits.float() / t, dim=-1)
    return t * t * F.kl_div(new, old, log_target=True, reduction="batchmean")


class Distillation(TrainingHook):
    """loss + weight * :func:`distillation_loss` on the ``labels`` columns, the old model being the
    trainable parameters' ``old`` values swapped in for one no-grad forward pass before each batch."""

    def __init__(self, weight: float, temperature: float, old: dict[str, torch.Tensor], labels: list[int]) -> None:
        self.weight, self.temperature, self.old, self.labels = weight, temperature, old, labels
        self.last = 0.0

    def begin(self, ctx: TrainContext) -> None:
        self.params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        if set(self.params) != set(self.old):
            raise ValueError("LwF: the stored old model does not match the model's trainable parameters")
        self.old = {n: t.to(ctx.device) for n, t in self.old.items()}
        self.cols = torch.tensor(self.labels, device=ctx.device)
        source, task_loss, model = ctx.batch_source, ctx.task_loss, ctx.model
        self.old_logits: torch.Tensor | None = None
        self.new_logits: torch.Tensor | None = None

        def with_old_outputs(epoch: int):
            for item in source(epoch):
                if item is not None:
                    batch = {k: v.to(ctx.device) for k, v in item[0].items()}
                    self.old_logits = self._old_outputs(model, batch)
                yield item

        def recording(outputs, labels: torch.Tensor) -> torch.Tensor:
            self.new_logits = outputs.logits
            return task_loss(outputs, labels)

        ctx.batch_source, ctx.task_loss = with_old_outputs, recording

    @torch.no_grad()
    def _old_outputs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        now = {n: p.detach().clone() for n, p in self.params.items()}
        was_training = model.training
        try:
            for n, p in self.params.items():
                p.copy_(self.old[n])
            model.eval()
            return model(**batch).logits.index_select(-1, self.cols)
        finally:
            model.train(was_training)
            for n, p in self.params.items():
                p.copy_(now[n])

    def loss(self, ctx: TrainContext, loss: torch.Tensor) -> torch.Tensor:
        if self.old_logits is None or self.new_logits is None:
            return loss
        kd = distillation_loss(self.new_logits.index_select(-1, self.cols), self.old_logits, self.temperature)
        self.last = kd.detach()
        self.old_logits = self.new_logits = None
        return loss + self.weight * kd

    def end(self, ctx: TrainContext) -> dict:
        return {"lwf-distillation": float(self.last)}


def _state_name(client: ClientRound, task: int) -> str:
    return f"lwf-{client.cfg.digest()}-task{task}-old"


def distillation(client: ClientRound, weight: float, temperature: float) -> list[TrainingHook]:
    """The round's LwF hook: the old model of this task (stored the first round the client trains
    on it, from the model it received) and the finished tasks' label columns."""
    task = task_of_round(client.cfg, client.server_round)
    if task == 0 or weight == 0:
        return []
    name = _state_name(client, task)
    old = client.store.load(client.client_id, name)
    if old is None:
        old = {n: p.detach().clone().cpu() for n, p in client.model.named_parameters() if p.requires_grad}
        client.store.save(client.client_id, name, old)
    labels = sorted({i for j in range(task) for i in task_label_indices(client.cfg, j)})
    return [Distillation(weight, temperature, old, labels)]

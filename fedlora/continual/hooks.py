"""The continual-learning losses as hooks on fedlora's one training loop."""

from __future__ import annotations

import torch

from fedlora.continual.penalties import attention_l1, l2_norms, orthogonality
from fedlora.factors import ADAPTER, lora_layers
from fedlora.training import TrainContext, TrainingHook


class OLoraPenalty(TrainingHook):
    """loss + lambda1 * sum_modules orthogonality(A_past, A_new) + lambda2 * sum ||theta_new||_2.

    ``past_a``: per module, the earlier tasks' A stacked along the rank (frozen)."""

    def __init__(self, past_a: dict[str, torch.Tensor], lambda1: float, lambda2: float, form: str = "abs") -> None:
        self.past_a, self.lambda1, self.lambda2, self.form = past_a, lambda1, lambda2, form
        self.last: dict[str, float] = {}

    def begin(self, ctx: TrainContext) -> None:
        self.layers = dict(lora_layers(ctx.model))
        missing = set(self.past_a) - set(self.layers)
        if missing:
            raise ValueError(f"past tasks' A for modules the model does not adapt: {sorted(missing)}")
        self.past_a = {n: a.to(ctx.device) for n, a in self.past_a.items()}

    def loss(self, ctx: TrainContext, loss: torch.Tensor) -> torch.Tensor:
        total = loss
        if self.past_a and self.lambda1:
            orth = sum(orthogonality(a, self.layers[n].lora_A[ADAPTER].weight, self.form)
                       for n, a in self.past_a.items())
            total = total + self.lambda1 * orth
            self.last["olora-orthogonality"] = float(orth.detach())
        if self.lambda2:
            new = [t for layer in self.layers.values()
                   for t in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
            l2 = l2_norms(new)
            total = total + self.lambda2 * l2
            self.last["olora-l2"] = float(l2.detach())
        return total

    def end(self, ctx: TrainContext) -> dict:
        return dict(self.last)


class AttentionL1(TrainingHook):
    """AM-LoRA: loss + lambda * L1 of the task entries of the attention, averaged over the layers
    of this step's forward pass (the mixer records them)."""

    def __init__(self, mixer, lam: float) -> None:  # noqa: ANN001 - a TaskLoraMixer
        self.mixer, self.lam = mixer, lam
        self.last = 0.0

    def loss(self, ctx: TrainContext, loss: torch.Tensor) -> torch.Tensor:
        att = self.mixer.attention
        if not att:
            return loss
        pen = torch.stack([attention_l1(a) for a in att]).mean()
        att.clear()
        self.last = float(pen.detach())
        return loss + self.lam * pen

    def end(self, ctx: TrainContext) -> dict:
        return {"amlora-attention-l1": self.last}

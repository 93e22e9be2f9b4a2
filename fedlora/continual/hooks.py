"""The continual-learning losses as hooks on fedlora's one training loop."""

from __future__ import annotations

import torch

from fedlora.continual.penalties import attention_l1, l2_norms, orthogonality
from fedlora.factors import ADAPTER, lora_layers
from fedlora.training import TrainContext, TrainingHook, make_optimizer


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
            orth = sum(
                orthogonality(a, self.layers[n].lora_A[ADAPTER].weight, self.form) for n, a in self.past_a.items()
            )
            total = total + self.lambda1 * orth
            self.last["olora-orthogonality"] = float(orth.detach())
        if self.lambda2:
            new = [
                t
                for layer in self.layers.values()
                for t in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
            ]
            l2 = l2_norms(new)
            total = total + self.lambda2 * l2
            self.last["olora-l2"] = float(l2.detach())
        return total

    def end(self, ctx: TrainContext) -> dict:
        return dict(self.last)


class AmLoraTraining(TrainingHook):
    """AM-LoRA's part of a step: the selector's own learning rate, and loss + lambda * L1 of the task
    entries of the attention, averaged over the layers of this step's forward pass (the mixer
    records them). Under the input-key router, the selector's moments leave the optimizer (they are
    statistics), the mixer measures the current task's from the training forwards, and ``end``
    writes them into the selector, which the reply then carries.

    Why its own rate: the selector starts at uniform attention and has only a few steps per task to
    leave it. At the LoRA's rate (1e-3 with AdamW, about 12 steps a task in the continual comparison)
    its scores moved by under 0.02 over a whole run, so the attention stayed uniform and task t's
    LoRA kept a weight of 1/(t+2): a scaled-down IncLoRA, not a selection."""

    def __init__(self, mixer, lam: float, selector_lr: float = 0.0) -> None:
        self.mixer, self.lam, self.selector_lr = mixer, lam, selector_lr
        self.last = 0.0

    def begin(self, ctx: TrainContext) -> None:
        sel = self.mixer.selector
        if sel is None:
            return
        stats = {id(p) for p in sel.statistics()}
        if stats:
            self.mixer.reset_keys()
            for p in sel.statistics():
                p.requires_grad_(False)
            ctx.params = [p for p in ctx.params if id(p) not in stats]
        elif not self.selector_lr:
            return
        own = {id(p) for p in sel.parameters()} if self.selector_lr else set()
        groups = [
            {"params": [p for p in ctx.params if id(p) not in own]},
            {"params": [p for p in ctx.params if id(p) in own], "lr": self.selector_lr},
        ]
        # A selector the sharing policy froze is not among ctx.params: its group is empty, dropped.
        ctx.optimizer = make_optimizer([g for g in groups if g["params"]], ctx.tc)

    def loss(self, ctx: TrainContext, loss: torch.Tensor) -> torch.Tensor:
        att = self.mixer.attention
        if not att:
            return loss
        pen = torch.stack([attention_l1(a) for a in att]).mean()
        att.clear()
        self.last = float(pen.detach())
        return loss + self.lam * pen if self.lam else loss

    def end(self, ctx: TrainContext) -> dict:
        if self.mixer.local_moments:
            self.mixer.store_keys()
        return {"amlora-attention-l1": self.last}

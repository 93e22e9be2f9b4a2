"""FedProx's proximal term as a hook on fedlora's training loop (see :mod:`fedlora.methods.fedprox`)."""

from __future__ import annotations

import torch

from fedlora.factors import ADAPTER, extra_part, head_parameters, lora_layers
from fedlora.training import TrainContext, TrainingHook


def part_parameters(model: torch.nn.Module, parts: frozenset[str]) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``model`` in the sharing ``parts`` ('A', 'B', 'head', 'selector')."""
    out = []
    for _, layer in lora_layers(model):
        for part, mod in (("A", layer.lora_A[ADAPTER]), ("B", layer.lora_B[ADAPTER])):
            if part in parts and mod.weight.requires_grad:
                out.append(mod.weight)
    out += [p for name, p in head_parameters(model) if extra_part(name) in parts and p.requires_grad]
    return out


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """sum_i ||params_i - anchor_i||^2 (squared Frobenius norms, summed over tensors)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))


class ProximalTerm(TrainingHook):
    """loss + mu/2 * sum ||theta - theta_start||^2 over the given parts' trainable parameters, where
    theta_start is their value when training begins (the factors the client received)."""

    def __init__(self, mu: float, parts: frozenset[str]) -> None:
        self.mu, self.parts = mu, frozenset(parts)
        self.params: list[torch.nn.Parameter] = []
        self.anchor: list[torch.Tensor] = []

    def begin(self, ctx: TrainContext) -> None:
        self.params = part_parameters(ctx.model, self.parts)
        if not self.params:
            raise ValueError(f"FedProx: the model trains none of the shared parts {sorted(self.parts)}")
        self.anchor = [p.detach().clone() for p in self.params]

    def loss(self, ctx: TrainContext, loss: torch.Tensor) -> torch.Tensor:
        return loss + 0.5 * self.mu * proximal_term(self.params, self.anchor)

    def end(self, ctx: TrainContext) -> dict:
        with torch.no_grad():
            return {"fedprox-distance": float(proximal_term(self.params, self.anchor)) ** 0.5}

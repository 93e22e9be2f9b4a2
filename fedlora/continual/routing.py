"""AM-LoRA's input-key router as pure functions of tensors (the selector of ``amlora_router = "input-keys"``).

Each adapted layer keeps, per task, the first two moments of its *pooled input* over that task's
training examples: the layer's input averaged over an example's real tokens (padding left out).
An input's score for task t is the mean over features of the diagonal Gaussian log-density of its
pooled input under task t's moments, divided by a temperature:

    score_t(x) = -1/2 * mean_d [ (x_d - mu_td)^2 / v_td + log v_td ] / temperature

with ``v = max(m2 - mu^2, 0)`` floored at a thousandth of its mean over features (a feature that
never varied must not decide alone). The scores of the task slots join the zero LoRA's logit in
AM-LoRA's softmax. Why input statistics: a scorer trained by gradient on the current task alone
sees no input of any other task, and measured it sent every input to the newest LoRA; each task's
moments are fixed when its task ends, so what routes task t's inputs is learned on task t's data.
"""

from __future__ import annotations

import torch

VARIANCE_FLOOR = 1e-3  # times the mean variance over features; and an absolute 1e-12 for all-zero slots


def pooled_inputs(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, features): ``x`` (batch, ..., features) averaged over every axis between the first and
    the last, over the positions ``mask`` (batch, positions) marks when it fits ``x``'s (batch, positions)."""
    if x.dim() == 2:
        return x
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        m = mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)
    return x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)


def moments(pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sums of ``pooled`` (batch, features) and of its squares over the batch, and the batch size:
    what a client accumulates over a round, in double precision."""
    p = pooled.detach().double()
    return p.sum(0), p.pow(2).sum(0), int(p.shape[0])


def variances(mean: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per task (rows), the floored variance of each feature from the first and second moments."""
    v = (second - mean.pow(2)).clamp_min(0.0)
    return v + VARIANCE_FLOOR * v.mean(-1, keepdim=True) + 1e-12


def key_scores(pooled: torch.Tensor, mean: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """(batch, tasks): each input's score for each task (see the module docstring); ``mean`` and
    ``second`` are (tasks, features)."""
    v = variances(mean.to(pooled.dtype), second.to(pooled.dtype))
    z = (pooled.unsqueeze(-2) - mean.to(pooled.dtype)).pow(2) / v + v.log()
    return -0.5 * z.mean(-1) / temperature

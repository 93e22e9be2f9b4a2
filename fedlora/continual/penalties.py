"""The continual-learning regularisers as pure functions of factor tensors.

O-LoRA (Wang et al. 2023; code cmnfriend/O-LoRA): the new task's LoRA is kept orthogonal to the
subspaces of earlier tasks through its down-projection A:

    orthogonality = sum over modules of sum_ij |(A_past @ A_new^T)_ij|      (the code's form, "abs")
                    sum over modules of sum_ij (A_past @ A_new^T)_ij ** 2   (the paper's form, "squared")

with A_past the earlier tasks' A stacked along the rank dimension (r_past x in) and A_new (r x in);
and an L2 term on the new LoRA's parameters, the unsquared norm of each tensor summed (the code's
``torch.norm(param, p=2)``).

AM-LoRA (Liu et al. 2024): an L1 norm on the attention vector over task LoRAs. Softmax attention
sums to one, so the L1 norm of the whole vector (zero LoRA included) is the constant 1; the penalty
is the L1 norm of the task entries, i.e. the weight not given to the zero LoRA.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def orthogonality(past_a: torch.Tensor, new_a: torch.Tensor, form: str = "abs") -> torch.Tensor:
    """O-LoRA's orthogonality loss of one module: past (r_past x in) against new (r x in)."""
    if past_a.shape[1] != new_a.shape[1]:
        raise ValueError(f"A of the past tasks has {past_a.shape[1]} input features, the new A {new_a.shape[1]}")
    inner = past_a @ new_a.T
    if form == "abs":
        return inner.abs().sum()
    if form == "squared":
        return inner.pow(2).sum()
    raise ValueError(f"orthogonality form must be 'abs' or 'squared', got {form!r}")


def l2_norms(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum of the (unsquared) L2 norms of ``params``: O-LoRA's λ2 term."""
    norms = [p.norm(p=2) for p in params]
    if not norms:
        return torch.zeros(())
    return torch.stack(norms).sum()


def attention_l1(attention: torch.Tensor) -> torch.Tensor:
    """AM-LoRA's sparsity term for attention weights of shape (..., 1 + tasks), index 0 the zero
    LoRA: the mean over inputs of the L1 norm of the task entries."""
    return attention[..., 1:].abs().sum(-1).mean()

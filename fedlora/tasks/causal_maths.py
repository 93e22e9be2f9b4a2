"""Causal-LM instruction tuning's pure maths: a prompt and response cut to fit, the training labels
of a batch (prompt and padding ignored), the next-token loss on the response only, perplexity.
Model-free, so `benchmarks.mutation` mutates it with its own fast tests (tests/test_causal_maths.py);
the formats and tokenization that feed it are :mod:`fedlora.tasks.causal`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a token that is not scored (prompt, padding): PyTorch's ignore_index
# Kept at the end of a prompt cut to fit: the cue the response follows ("...\nAnswer:").
TAIL_TOKENS = 16


def fit(p: list[int], r: list[int], limit: int) -> tuple[list[int], list[int], bool, bool]:
    """Prompt and response cut to ``limit`` tokens together: the response keeps up to half of the
    budget when both are long; the prompt loses tokens from its middle (keeping its start and its
    last ``TAIL_TOKENS``, the cue the response follows)."""
    floor = min(len(p), limit // 2)  # the prompt keeps at least this much
    cut_r = len(r) > limit - floor
    if cut_r:
        r = r[: limit - floor]
    budget = limit - len(r)
    cut_p = len(p) > budget
    if cut_p:
        tail = min(TAIL_TOKENS, budget // 2)
        p = p[: budget - tail] + p[len(p) - tail :]
    return p, r, cut_p, cut_r


def token_labels(ids: torch.Tensor, mask: torch.Tensor, prompt_lengths: torch.Tensor) -> torch.Tensor:
    """Training labels of a right-padded batch: the ids, with prompt and padding tokens IGNOREd."""
    labels = ids.masked_fill(mask == 0, IGNORE)
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    return labels.masked_fill(positions < prompt_lengths.unsqueeze(1), IGNORE)


def causal_lm_loss(outputs, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the response tokens: each example's mean over its own response,
    then the mean over the batch. Not the mean over all the batch's tokens: under DP-SGD each
    example's gradient must not depend on the other examples of its batch (their token counts),
    or per-example clipping would no longer bound what one example changes."""
    per_token, scored = response_nll(outputs.logits, labels)
    return (per_token.sum(dim=1) / scored.sum(dim=1).clamp(min=1)).mean()


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token negative log-likelihood of every position ([batch, length - 1], float32, 0 where
    not scored) and the mask of scored (response) positions: token t is predicted at position t - 1.

    Only the scored rows of ``logits`` are gathered (one contiguous [scored, vocab] block) and
    upcast to float32 for the softmax: the prompt and padding positions, most of a batch, are
    never copied, and the class dimension stays last (a transposed [batch, vocab, length] input
    makes cross-entropy stride across the vocabulary)."""
    target = labels[:, 1:]
    scored = target != IGNORE
    per_token = torch.zeros(target.shape, dtype=torch.float32, device=logits.device)
    rows = logits[:, :-1][scored]
    per_token = per_token.index_put((scored,), F.cross_entropy(rows.float(), target[scored], reduction="none"))
    return per_token, scored


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf

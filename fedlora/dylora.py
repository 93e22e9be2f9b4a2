"""DyLoRA rank truncation (Valipour et al., arXiv 2210.07558) that Opacus can differentiate.

Training at rank b <= r uses A[:b], B[:, :b] and scaling alpha / b. Slicing the weights inside a
patched forward hides the LoRA modules from Opacus' per-sample-gradient hooks, so instead the rank
dimension is masked at the *input* of each ``lora_B`` (a forward pre-hook): both factors stay plain
``nn.Linear`` modules, the output equals the rank-b adapter's, and gradients (per-sample ones too)
reach only components 0..b-1. (A hook on lora_A's output would give Opacus wrong per-sample
gradients for A's tail rows.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from fedlora.extensions import ClientRound, Extension
from fedlora.factors import ADAPTER, LoraFactors, lora_layers
from fedlora.lora_math import block, fit_rank, keep_uncovered
from fedlora.registry import register_extension
from fedlora.training import evaluate

if TYPE_CHECKING:
    from fedlora.config import FedLoraConfig
    from fedlora.data import Examples
    from fedlora.extensions import GlobalAdapter
    from fedlora.strategies.round_log import RoundLog


class RankMask:
    """``mask.set(b)`` trains/evaluates every adapted module at rank b; ``mask.set(None)`` restores r."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rank: int | None = None
        self._layers = [layer for _, layer in lora_layers(model)]
        self._alpha = [float(layer.lora_alpha[ADAPTER]) for layer in self._layers]
        self._scaling = [float(layer.scaling[ADAPTER]) for layer in self._layers]
        self.max_rank = min(int(layer.r[ADAPTER]) for layer in self._layers)
        self._handles = [layer.lora_B[ADAPTER].register_forward_pre_hook(self._pre) for layer in self._layers]

    def _pre(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if self.rank is None:
            return None
        x = args[0]
        keep = (torch.arange(x.shape[-1], device=x.device) < self.rank).to(x.dtype)
        return (x * keep,)

    def set(self, rank: int | None) -> None:
        if rank is not None and not 1 <= rank <= self.max_rank:
            raise ValueError(f"DyLoRA rank {rank} is outside 1..{self.max_rank}")
        self.rank = rank
        for layer, alpha, base in zip(self._layers, self._alpha, self._scaling):
            layer.scaling[ADAPTER] = base if rank is None else alpha / rank

    def remove(self) -> None:
        self.set(None)
        for h in self._handles:
            h.remove()
        self._handles = []


def round_rank(seed: int, server_round: int, min_rank: int, max_rank: int) -> int:
    """DP-DyLoRA's schedule: the one rank b every client sampled in ``server_round`` trains, drawn
    uniformly from min_rank..max_rank by the server, reproducibly from the run seed. (Per-client,
    per-step ranks, as naive DyLoRA would draw them, make what a client contributes data-dependent
    in shape and break the client-level DP analysis.)"""
    import random

    return random.Random(f"dylora:{seed}:{server_round}").randint(min_rank, max_rank)


@register_extension
class DyLoRARank(Extension):
    """DP-DyLoRA (``dylora.enabled``): a client trains at the round's rank b, which the server sends
    as ``dylora-rank`` (:func:`round_rank`), and replies with the leading rank-b block only. The
    server evaluates the global adapter truncated to each of ``dylora.eval_ranks`` (scaling alpha/r)."""

    name = "dylora"
    _round_rank = 0  # the rank begin_round drew for the round being configured
    order = 10  # the outermost context: every other hook trains the masked adapter

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return cfg.dylora.enabled or bool(cfg.dylora.eval_ranks)

    def begin_round(self, run: GlobalAdapter, rl: RoundLog) -> None:
        if self.cfg.dylora.enabled:
            d = self.cfg.dylora
            rl.dylora_rank = self._round_rank = round_rank(self.cfg.run.seed, rl.server_round, d.min_rank, run.max_rank)

    def round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        return {"dylora-rank": self._round_rank} if self.cfg.dylora.enabled else {}

    def after_fold(self, run: GlobalAdapter, rl: RoundLog, previous: LoraFactors) -> LoraFactors:
        if rl.dylora_rank is None:
            return run.global_eff
        # Only the leading block was trained and sent: the components it did not cover stay as they were.
        return keep_uncovered(fit_rank(run.global_eff, run.max_rank), previous, rl.dylora_rank)

    @contextmanager
    def server_evaluation(
        self, model: torch.nn.Module, server_round: int, test: Examples, device: torch.device
    ) -> Iterator[Callable[[], dict[str, Any]]]:
        yield lambda: self._truncated(model, test, device)

    def _truncated(self, model: torch.nn.Module, test: Examples, device: torch.device) -> dict[str, Any]:
        row: dict[str, Any] = {}
        mask = RankMask(model)
        try:
            for r in self.cfg.dylora.eval_ranks:
                mask.set(min(r, mask.max_rank))
                at_rank = evaluate(model, test, self.cfg.train.eval_batch_size, device)
                row[f"server-accuracy-rank-{r}"] = at_rank.get("accuracy")
                row[f"server-loss-rank-{r}"] = at_rank["loss"]
        finally:
            mask.remove()
        return row

    @staticmethod
    def rank(client: ClientRound) -> int | None:
        return int(client.config.get("dylora-rank", 0)) or None

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list]:
        rank = self.rank(client)
        if rank is None:
            yield []
            return
        mask = RankMask(client.model)
        try:
            mask.set(rank)
            yield []
        finally:
            mask.remove()

    def reply_factors(self, client: ClientRound, factors: LoraFactors) -> LoraFactors:
        rank = self.rank(client)
        return factors if rank is None else block(factors, rank)

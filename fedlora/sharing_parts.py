"""What a strategy's :class:`~fedlora.sharing.SharingPolicy` declares beyond what travels, done on the
client as extensions (:mod:`fedlora.extensions`), as PEFT turns a ``LoraConfig`` flag into a variant's
hooks: the client session loads, trains and replies the same way for every strategy.

* :class:`PrivateParts` (``policy.private``, FedSA-LoRA's B): each client keeps those parts in its
  client-state store across rounds, also rounds it is not sampled, and starts every message from them;
* :class:`MergedBase` (``policy.merge_global_into_base``, FLoRA): every round starts a fresh adapter
  (A from the round's seed, B zero), and the server's cumulative global delta, sent in factored form
  under ``base/``, is merged into the client's base weights;
* :class:`RankSelfPruning` (``hetero.hetlora_prune`` with ``policy.heterogeneous_ranks``, HetLoRA):
  after training a client drops the trailing rank components of small norm from its reply and
  trains at the lower rank from then on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fedlora import codec
from fedlora.extensions import ClientRound, Extension
from fedlora.lora_math import prune_rank, prune_to_rank
from fedlora.model import merge_delta_into_base
from fedlora.protocol import BASE_PREFIX
from fedlora.registry import policy_for, register_extension
from fedlora.state import OWN_RANK

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord

    from fedlora.config import FedLoraConfig
    from fedlora.factors import LoraFactors
    from fedlora.state import ClientStateStore

PRIVATE = "private"  # the client-state store's name for a client's private parts
log = logging.getLogger("fedlora.client")


@register_extension
class PrivateParts(Extension):
    """The policy's private parts stay on each client: kept after training, loaded before the
    received shared parts go over them."""

    name = "private-parts"
    order = 1

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self.private = policy_for(cfg.federation.strategy).private

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return bool(policy_for(cfg.federation.strategy).private)

    def own_parts(self, client_id: str, store: ClientStateStore, start: LoraFactors) -> LoraFactors:
        kept = store.load(client_id, PRIVATE)
        if kept is None:  # its first round: the seed-built parts
            return start
        return start.merged_with(kept.select(self.private))

    def keep_own(self, client_id: str, store: ClientStateStore, trained: LoraFactors) -> None:
        store.save(client_id, PRIVATE, trained.select(self.private))


@register_extension
class MergedBase(Extension):
    """A fresh adapter every round over a base that holds the global delta so far."""

    name = "merged-base"
    order = 1

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return policy_for(cfg.federation.strategy).merge_global_into_base

    def adapter_seed(self, server_round: int, seed: int) -> int:
        return seed + server_round

    def after_load(self, model: torch.nn.Module, arrays: ArrayRecord, modules: list[str]) -> None:
        base = codec.decode(arrays, alpha=1.0, prefix=BASE_PREFIX, modules=modules)
        if base.modules:
            merge_delta_into_base(model, base)


@register_extension
class RankSelfPruning(Extension):
    """HetLoRA's self-pruning (``hetero.hetlora_prune_ratio``): the reply keeps the rank
    :func:`~fedlora.lora_math.prune_rank` finds over every module (the smallest), and the client's
    store remembers it, so its next setup declares the lower rank."""

    name = "rank-self-pruning"
    order = 90  # the last say on what the reply carries

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return cfg.hetero.hetlora_prune and policy_for(cfg.federation.strategy).heterogeneous_ranks

    def reply_factors(self, client: ClientRound, factors: LoraFactors) -> LoraFactors:
        if not factors.modules:
            return factors
        rank = next(iter(factors.modules.values())).rank
        new_rank = min(prune_rank(m, self.cfg.hetero.hetlora_prune_ratio) for m in factors.modules.values())
        if new_rank >= rank:
            return factors
        log.info("client %s prunes its rank %d -> %d", client.client_id, rank, new_rank)
        client.store.save(client.client_id, OWN_RANK, new_rank)
        return prune_to_rank(factors, new_rank, self.cfg.lora.alpha_for_rank(new_rank))

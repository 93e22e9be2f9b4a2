"""FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463).

A learns what clients share, B what is particular to each: only A is aggregated (weighted by
examples); every client keeps its own B, and, as the authors' GLUE code does
(``personalization.local_param: ['lora_B', 'classifier']``), its own classification head, in its
client-state store across rounds, including rounds it is not sampled.

Mixed ranks are refused: A's of different ranks would have to be padded, and each client's
private B is paired with the rows of its own A, so padding would silently change what B means.
"""

from __future__ import annotations

from fedlora.config import ConfigError
from fedlora.lora_math import weighted_mean
from fedlora.registry import register_strategy
from fedlora.sharing import SharingPolicy
from fedlora.strategies.base import LoraStrategy, Update


@register_strategy("fedsa")
class FedSALoRA(LoraStrategy):
    sharing_policy = SharingPolicy(shared=frozenset({"A"}), private=frozenset({"B", "head"}))

    def check_profiles(self, profiles) -> None:  # noqa: ANN001
        ranks = sorted({p.rank for p in profiles})
        if len(ranks) > 1:
            raise ConfigError(
                f"fedsa cannot mix ranks {ranks}: it averages A across clients while each client keeps a private "
                "B paired with the rows of its own A, so zero-padding A would change what every B means. "
                "Use one rank with fedsa, or hetlora / flora / flexlora for mixed ranks.")

    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        self.global_eff = weighted_mean([u.factors.select({"A"}) for u in updates], [u.weight for u in updates])

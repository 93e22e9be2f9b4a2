"""FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313).

A is initialised once, non-zero, from a seed the server and every client share, then frozen: it
is never trained and never sent (each client rebuilds it from ``lora.init_seed``). Clients train
and send only B (and the head); the server averages B. With A common and fixed, the average of
the products equals the product of the averages: aggregation is exact, and upload halves.
"""

from __future__ import annotations

from fedlora.lora_math import to_effective
from fedlora.registry import register_strategy
from fedlora.sharing import SharingPolicy
from fedlora.strategies.base import LoraStrategy, Update


@register_strategy("ffa")
class FFALoRA(LoraStrategy):
    sharing_policy = SharingPolicy(shared=frozenset({"B", "head"}), frozen=frozenset({"A"}))

    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        self.global_eff = self.average([to_effective(u.factors) for u in updates], [u.weight for u in updates])

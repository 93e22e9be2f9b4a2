"""FedIT (Zhang et al., "Towards Building the Federated GPT", arXiv 2305.05644).

FedAvg over the LoRA factors: A and B are averaged separately, weighted by each client's number
of examples, and so is the task head. The product of the averages is not the average of the
products; that aggregation error is what FFA-LoRA, FLoRA and FlexLoRA remove.
"""

from __future__ import annotations

from fedlora.lora_math import to_effective
from fedlora.registry import register_strategy
from fedlora.sharing import SharingPolicy
from fedlora.strategies.base import LoraStrategy, Update


@register_strategy("fedit")
class FedIT(LoraStrategy):
    sharing_policy = SharingPolicy(shared=frozenset({"A", "B", "head"}))

    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        self.global_eff = self.average([to_effective(u.factors) for u in updates], [u.weight for u in updates])

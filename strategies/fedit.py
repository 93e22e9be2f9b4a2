"""FedIT (Zhang et al., "Towards Building the Federated GPT", arXiv 2305.05644).

FedAvg over the LoRA factors: A and B are averaged separately, weighted by each client's number
of examples, and so is the task head. The product of the averages is not the average of the
products; that aggregation error is what FFA-LoRA, FLoRA and FlexLoRA remove.
"""

from __future__ import annotations

from fedlora.registry import register_strategy
from fedlora.strategies.base import LoraStrategy


@register_strategy("fedit")
class FedIT(LoraStrategy):
    """The base's fold as it is: the weighted mean of the effective factors (A, s*B, head)."""

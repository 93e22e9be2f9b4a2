"""FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463).

A learns what clients share, B what is particular to each: only A is aggregated (weighted by
examples); every client keeps its own B, and, as the authors' GLUE code does
(``personalization.local_param: ['lora_B', 'classifier']``), its own classification head, in its
client-state store across rounds, including rounds it is not sampled.

Mixed ranks are refused when the config is loaded (:class:`fedlora.config.FedLoraConfig`): A's of different ranks would have to be padded, and each client's
private B is paired with the rows of its own A, so padding would silently change what B means.
"""

from __future__ import annotations

from fedlora.factors import LoraFactors
from fedlora.registry import register_strategy
from fedlora.strategies.base import LoraStrategy, Update


@register_strategy("fedsa")
class FedSALoRA(LoraStrategy):
    def fold_input(self, update: Update) -> LoraFactors:
        return update.factors.select({"A"})  # A carries no scaling: its client form is its effective form

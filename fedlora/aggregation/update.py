"""The unit a round folds: one accepted client update (what the reply stages pass on)."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.factors import LoraFactors
from fedlora.protocol import NodeProfile


@dataclass
class Update:
    """One accepted client update, in the client's own form."""

    profile: NodeProfile
    factors: LoraFactors
    weight: float  # aggregation weight (example count, capped by robust.max_client_share)
    metrics: dict
    num_examples: int = 0

"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): heterogeneous ranks by zero-padding.

Each client trains its own rank r_k <= r_max. The server pads every client's A (rows) and B
(columns) to r_max, averages with sparsity-weighted aggregation (client k's weight for a module is
proportional to its example count times ||B_k A_k||_F, normalised over clients), and each client
receives the global factors truncated to its own rank. Optional local rank self-pruning
(``hetero.hetlora_prune``) lets a client drop trailing components whose share of the update's
norm is below ``hetero.hetlora_prune_ratio``.

Ranks are aggregated in effective form (B carries alpha_k / r_k), so clients with different
scalings add up correctly; see :mod:`fedlora.lora_math`.
"""

from __future__ import annotations

from fedlora.lora_math import aggregate_zero_padded, to_effective
from fedlora.registry import register_strategy
from fedlora.sharing import SharingPolicy
from fedlora.strategies.base import LoraStrategy, Update


@register_strategy("hetlora")
class HetLoRA(LoraStrategy):
    sharing_policy = SharingPolicy(shared=frozenset({"A", "B", "head"}), heterogeneous_ranks=True)

    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        max_rank = max(self.global_rank(), *(u.factors.modules[next(iter(u.factors.modules))].rank for u in updates))
        self.global_eff = aggregate_zero_padded([to_effective(u.factors) for u in updates],
                                                [u.weight for u in updates], max_rank, sparsity_weighted=True)

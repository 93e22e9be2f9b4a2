"""HetLoRA (Cho et al., EMNLP 2024, arXiv 2401.06432): heterogeneous ranks by zero-padding.

Each client trains its own rank r_k <= r_max. The server pads every client's A (rows) and B
(columns) to r_max, averages with sparsity-weighted aggregation (client k's weight for a module is
proportional to its example count times ||B_k A_k||_F, normalised over clients), and each client
receives the global factors truncated to its own rank. Optional local rank self-pruning
(``hetero.hetlora_prune``) lets a client drop trailing components whose share of the update's
norm is below ``hetero.hetlora_prune_ratio``.

Under partial sampling a round may sample only low-rank clients; the padding formula then sets
the higher components of A and B both to zero, and such components never receive a gradient
again. ``hetero.hetlora_keep_uncovered`` (on by default) keeps the previous global's components
where no sampled client covers them (:func:`fedlora.lora_math.keep_uncovered`); set it false for
the paper's formula exactly.

Ranks are aggregated in effective form (B carries alpha_k / r_k), so clients with different
scalings add up correctly; see :mod:`fedlora.lora_math`.
"""

from __future__ import annotations

from fedlora.lora_math import aggregate_zero_padded, keep_uncovered, to_effective
from fedlora.registry import register_strategy
from fedlora.sharing import SharingPolicy
from fedlora.strategies.base import LoraStrategy, Update


@register_strategy("hetlora")
class HetLoRA(LoraStrategy):
    sharing_policy = SharingPolicy(shared=frozenset({"A", "B", "head"}), heterogeneous_ranks=True)

    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        covered = max(u.factors.modules[next(iter(u.factors.modules))].rank for u in updates)
        max_rank = max(self.global_rank(), covered)
        new = aggregate_zero_padded([to_effective(u.factors) for u in updates],
                                    [u.weight for u in updates], max_rank, sparsity_weighted=True)
        if self.cfg.hetero.hetlora_keep_uncovered:
            new = keep_uncovered(new, self.global_eff, covered)
        self.global_eff = new

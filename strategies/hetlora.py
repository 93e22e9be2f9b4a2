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

from fedlora.aggregation.folds import Fold, ZeroPaddedMean
from fedlora.factors import LoraFactors
from fedlora.lora_math import keep_uncovered
from fedlora.registry import register_strategy
from fedlora.strategies.base import LoraStrategy


@register_strategy("hetlora")
class HetLoRA(LoraStrategy):
    def new_fold(self, server_round: int, sampled: int) -> Fold:
        # Norm weights are per update: the fold keeps the norm-weighted sums and their weight total.
        return ZeroPaddedMean(
            max(self.global_rank(), self.max_rank), sparsity_weighted=True, min_rank=max(self.global_rank(), 1)
        )

    def finish_fold(self, server_round: int, fold: Fold) -> LoraFactors:
        new = fold.finish()
        return keep_uncovered(new, self.global_eff, fold.covered) if self.cfg.hetero.hetlora_keep_uncovered else new

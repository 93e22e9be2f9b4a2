"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): heterogeneous ranks by SVD.

The server forms the data-weighted average of the clients' full updates, sum_k p_k s_k B_k A_k,
and gives each client the truncated SVD of that average at the client's own rank, sqrt(S) split
between the two factors. From the stack of factors it needs no out x in matrix: the sum of
rank-r_k products has rank <= sum r_k, so a QR of the stacked factors and an SVD of the small core
suffice (:func:`fedlora.lora_math.low_rank_svd`). The global adapter is kept at the largest client rank;
its first r_k components are exactly the best rank-r_k approximation.

The round's sum of products is folded as replies arrive, in the most exact form that fits
``hetero.exact_budget_mb`` (:class:`fedlora.aggregation.product_sums.BudgetedProductSum`): the
stack for small cohorts, else the dense out x in sums, else a single-pass randomized sketch whose
size does not grow with the cohort (exact while the sum's rank is at most the sketch size; its
estimated relative error is logged, ``sketch-relative-error``). The round log's ``product-fold``
names the form.
"""

from __future__ import annotations

from fedlora.aggregation.folds import Fold
from fedlora.factors import LoraFactors
from fedlora.registry import register_strategy
from fedlora.strategies.base import LoraStrategy


@register_strategy("flexlora")
class FlexLoRA(LoraStrategy):
    def target_rank(self) -> int:
        return max([self.global_rank()] + [p.rank for p in self.profiles.values()])

    def new_fold(self, server_round: int, sampled: int) -> Fold:
        return self.product_fold(server_round, sampled, self.target_rank())

    def finish_fold(self, server_round: int, fold: Fold) -> LoraFactors:
        return fold.result(self.target_rank())

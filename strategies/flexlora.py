"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): heterogeneous ranks by SVD.

The server forms the data-weighted average of the clients' full updates, sum_k p_k s_k B_k A_k,
and gives each client the truncated SVD of that average at the client's own rank, sqrt(S) split
between the two factors. It never materialises an out x in matrix: the sum of rank-r_k products
has rank <= sum r_k, so a QR of the stacked factors and an SVD of the small core suffice
(:func:`fedlora.lora_math.low_rank_svd`). The global adapter is kept at the largest client rank;
its first r_k components are exactly the best rank-r_k approximation.

From ``hetero.sketch_from_clients`` clients a round on, the stack is replaced by a single-pass
randomized sketch of the weighted sum of products (:class:`fedlora.aggregation.folds.SketchedProductSum`):
each reply is folded into it from its factors and dropped, so the server's memory does not grow
with the cohort; the result is exact while the sum's rank is at most the sketch size, and the
estimated relative error of every round is logged (``sketch-relative-error``).
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

"""FlexLoRA (Bai et al., NeurIPS 2024, arXiv 2402.11505): heterogeneous ranks by SVD.

The server forms the data-weighted average of the clients' full updates, sum_k p_k s_k B_k A_k,
and gives each client the truncated SVD of that average at the client's own rank, sqrt(S) split
between the two factors. It never materialises an out x in matrix: the sum of rank-r_k products
has rank <= sum r_k, so a QR of the stacked factors and an SVD of the small core suffice
(:func:`fedlora.lora_math.low_rank_svd`). The global adapter is kept at the largest client rank;
its first r_k components are exactly the best rank-r_k approximation.
"""

from __future__ import annotations

from fedlora.lora_math import aggregate_svd, to_effective
from fedlora.registry import register_strategy
from fedlora.sharing import SharingPolicy
from fedlora.strategies.base import LoraStrategy, Update


@register_strategy("flexlora")
class FlexLoRA(LoraStrategy):
    sharing_policy = SharingPolicy(shared=frozenset({"A", "B", "head"}), heterogeneous_ranks=True)

    def aggregate(self, server_round: int, updates: list[Update]) -> None:
        rank = max([self.global_rank()] + [p.rank for p in self.profiles.values()])
        self.global_eff = aggregate_svd([to_effective(u.factors) for u in updates], [u.weight for u in updates], rank)

"""FLoRA (Wang et al., NeurIPS 2024, arXiv 2409.05976): heterogeneous ranks by stacking.

Each round the server stacks the clients' factors, A_k one below the other and p_k * B_k side by
side, so that B_stack @ A_stack equals sum_k p_k B_k A_k exactly whatever the ranks. As in the
authors' code, the aggregate is merged into the base weights and every client starts the next
round from a fresh adapter. The merge happens on the clients: the server sends the cumulative
global delta in factored form (``base/`` keys), so only low-rank factors ever travel and a client
that skipped rounds catches up in one message.

The stacked rank grows by sum_k r_k per round. ``hetero.flora_max_rank`` bounds it: above the
cap the cumulative delta is recompressed by an SVD of its small core (exact while the true rank
is under the cap, the best approximation otherwise). The download size follows the stacked rank
and is reported per round. The round's sum of products is folded as FlexLoRA's is (the stack,
the dense sum or the sketch, whichever is the most exact form that fits
``hetero.exact_budget_mb``); from the sketch it is read at ``min(flora_max_rank, sketch size)``.
"""

from __future__ import annotations

import torch

from fedlora.aggregation.folds import Fold
from fedlora.factors import LoraFactors, ModuleFactors, seeded_A
from fedlora.lora_math import concat_rank, svd_redistribute
from fedlora.protocol import NodeProfile
from fedlora.registry import register_strategy
from fedlora.strategies.base import LoraStrategy


@register_strategy("flora")
class FLoRA(LoraStrategy):
    def initial_global(self, init_eff: LoraFactors) -> LoraFactors:
        return LoraFactors(extras=dict(init_eff.extras))  # no delta merged yet

    def client_payload(self, profile: NodeProfile, server_round: int) -> tuple[LoraFactors, LoraFactors | None]:
        head = LoraFactors(extras=dict(self.global_eff.extras))
        delta = LoraFactors(modules=dict(self.global_eff.modules))
        return head, (delta if delta.modules else None)

    def start_factors(self, profile: NodeProfile, server_round: int) -> LoraFactors:
        """A fresh adapter each round: A from the round's seed, B zero, and the global head."""
        seed = self.cfg.lora.init_seed + server_round
        return LoraFactors(
            modules={
                n: ModuleFactors(
                    A=seeded_A(seed, n, profile.rank, m.A.shape[1]),
                    B=torch.zeros(m.B.shape[0], profile.rank),
                    alpha=profile.alpha,
                )
                for n, m in self.template.modules.items()
            },
            extras=dict(self.global_eff.extras),
        )

    def new_fold(self, server_round: int, sampled: int) -> Fold:
        return self.product_fold(server_round, sampled, self.cfg.hetero.flora_max_rank)

    def finish_fold(self, server_round: int, fold: Fold) -> LoraFactors:
        cap = self.cfg.hetero.flora_max_rank
        # The exact stack (rank sum r_k), or the sketch's best factors at the cap (or its own size k).
        k = getattr(fold, "k", None)
        stacked = fold.result(None if k is None else min(cap, k))
        cumulative = concat_rank(LoraFactors(modules=dict(self.global_eff.modules)), stacked)
        if self.global_rank_of(cumulative) > cap:
            cumulative = svd_redistribute(cumulative, cap)
        cumulative.extras = stacked.extras
        return cumulative

    @staticmethod
    def global_rank_of(f: LoraFactors) -> int:
        m = next(iter(f.modules.values()), None)
        return 0 if m is None else m.rank

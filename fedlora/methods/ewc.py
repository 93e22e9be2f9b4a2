"""EWC as a continual method (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural
networks", PNAS 2017), one of the two classic baselines in O-LoRA's comparison: one LoRA is trained
on task after task (as ``seq``), and while task t trains every client adds

    weight/2 * sum_{j<t} sum_i F_j,i * (theta_i - theta*_j,i)^2

over the LoRA's trainable parameters, where theta*_j is the federation's model when task j ended
and F_j the diagonal empirical Fisher information of task j at theta*_j: the mean over up to
``ewc.fisher_examples`` of the client's own task-j training examples of the squared gradient of
the example's log-likelihood (one example at a time, dropout off).

What is the client's and where it differs from the paper's single learner: each client estimates
F_j on its own share of task j, and keeps (theta*_j, F_j) in its client-state store. It takes
theta*_j as the global model it receives in the first round it trains on task j+1: the model
task j ended with when the client takes part in that round (the continual comparison samples every
client every round); a client that missed that round anchors to a later global of task j+1. Refused
with DP-SGD (Opacus' per-example clipping would drop a parameter penalty's gradient silently).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlora.extensions import ClientRound, Extension
from fedlora.registry import register_extension
from fedlora.schema import ConfigError, _meta, _require

if TYPE_CHECKING:
    from fedlora.config import FedLoraConfig
    from fedlora.sharing import SharingPolicy


@dataclass
class EWCSection:
    """``[ewc]``: the penalty's weight and the Fisher estimate's sample."""

    weight: float = _meta(
        "EWC's lambda: the Fisher-weighted pull toward each finished task's parameters "
        "(continual.method = 'ewc'); the default is what simulations/compare_continual.toml "
        "chose on validation.",
        default=10000.0,
    )
    fisher_examples: int = _meta(
        "Each client's examples of a finished task used for its diagonal Fisher (one backward pass each).", default=200
    )

    def validate(self) -> None:
        _require(
            math.isfinite(self.weight) and self.weight >= 0, "ewc.weight", f"must be finite and >= 0, got {self.weight}"
        )
        _require(self.fisher_examples >= 1, "ewc.fisher_examples", f"must be >= 1, got {self.fisher_examples}")


@register_extension
class EWC(Extension):
    """EWC: one LoRA over the task sequence, pulled toward each finished task's parameters by its Fisher."""

    name = "ewc"
    section_name = "ewc"
    section = EWCSection
    continual_method = "ewc"

    @classmethod
    def check_with_run(cls, cfg: FedLoraConfig, policy: SharingPolicy) -> None:
        if cfg.privacy.example_dp:
            raise ConfigError(
                "invalid config for 'continual.method': EWC's penalty is a function of the parameters, "
                "not of each example: Opacus' per-example clipping (privacy.example_dp) would drop its "
                "gradient silently. Use client-level DP (privacy.client_dp) with it"
            )

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list]:
        from fedlora.methods._ewc import fisher_penalty  # torch: the client's training only

        section = self.cfg.section("ewc")
        yield fisher_penalty(client, section.weight, section.fisher_examples)

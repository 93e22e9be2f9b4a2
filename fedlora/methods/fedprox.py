"""FedProx on the LoRA factors (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020): each client minimises its task loss plus ``mu/2 * ||theta - theta_global||^2`` over the
factors the strategy shares (theta_global: those factors as the client received them this round).

The server sends ``mu`` with every round as ``proximal-mu``, the key Flower's ``FedProx`` strategy
uses, so the term is the strategy's request and the client reads it from the message. The penalty
is the paper's squared norm (the gradient ``mu (theta - theta_global)`` its code adds); Flower's
FedProx docstring example sums unsquared norms instead. Only shared parts are pulled: FedSA-LoRA's
private B and head, FFA-LoRA's frozen A, are not. It composes with every strategy's sharing; under
FLoRA, whose clients restart a fresh adapter on the merged base each round, it pulls that adapter
toward its fresh start, i.e. the local model toward the global one. Refused with DP-SGD: Opacus
clips per-example gradients, and a penalty on the parameters has none.
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

MU_KEY = "proximal-mu"


@dataclass
class FedProxSection:
    """``[fedprox]``: the proximal term's weight."""

    mu: float = _meta(
        "FedProx's proximal weight mu: each client adds mu/2 ||theta - theta_global||^2 over the "
        "shared LoRA factors to its loss; 0 = off (Li et al. tune it in {0.001, 0.01, 0.1, 1}).",
        default=0.0,
    )

    def validate(self) -> None:
        _require(math.isfinite(self.mu) and self.mu >= 0, "fedprox.mu", f"must be finite and >= 0, got {self.mu}")


@register_extension
class FedProx(Extension):
    """FedProx: a proximal term toward the round's global factors on every client (``[fedprox] mu``)."""

    name = "fedprox"
    section_name = "fedprox"
    section = FedProxSection

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return cfg.section("fedprox").mu > 0

    @classmethod
    def check_with_run(cls, cfg: FedLoraConfig, policy: SharingPolicy) -> None:
        if cfg.privacy.example_dp:
            raise ConfigError(
                "invalid config for 'fedprox.mu': FedProx's proximal term is a function of the "
                "parameters, not of each example, and Opacus' per-example clipping (privacy.example_dp) "
                "would drop its gradient silently. Use client-level DP (privacy.client_dp) with FedProx"
            )

    def round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        return {MU_KEY: float(self.cfg.section("fedprox").mu)}

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list]:
        mu = float(client.config.get(MU_KEY, 0.0))
        if mu <= 0:
            yield []
            return
        from fedlora.methods._fedprox import ProximalTerm  # torch: the client's training only

        yield [ProximalTerm(mu, client.policy.shared - client.policy.frozen)]

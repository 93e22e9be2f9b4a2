"""Privacy accounting from library accountants, and noise calibration for a target epsilon.

Client level: the server samples a fixed number m of the N clients without replacement each
round, so the accounting model is Flower's ``RdpAccountant`` with sampling without replacement
and the replace-one neighbouring relation. Under replace-one, the sum of updates clipped to C
changes by up to 2C when one client is swapped, so noise of std z*C is a Gaussian mechanism of
noise multiplier z/2 relative to that sensitivity: fedlora composes z/2 (Flower's own wrappers
pass z, which under-counts by that factor).

Example level: Opacus' RDP accountant over Poisson-sampled DP-SGD steps (add/remove-one).
"""

from __future__ import annotations

import math
from functools import lru_cache

from fedlora.config import ConfigError, FedLoraConfig

MAX_NOISE = 100.0  # a target that needs more noise than this is refused: the model would learn nothing


def client_accountant(num_clients: int, delta: float):
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=num_clients,
            neighboring_relation=NeighboringRelation.REPLACE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT,
        )
    )


def client_event(noise_multiplier: float, sampled: int, num_clients: int):
    """One round's release: noise multiplier z relative to C is z/2 relative to replace-one's 2C."""
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(
        noise_multiplier=noise_multiplier / 2.0, sample_size=sampled, population_size=num_clients
    )


def client_epsilon(noise_multiplier: float, sampled: int, num_clients: int, rounds: int, delta: float) -> float:
    if noise_multiplier <= 0:
        return math.inf
    acc = client_accountant(num_clients, delta)
    acc.compose(client_event(noise_multiplier, sampled, num_clients), count=rounds)
    return float(acc.get_epsilon(delta))


def adaptive_count_std(sampled: int) -> float:
    """Std of the noise on adaptive clipping's count of clients under C: m/20 (Andrew et al.'s
    recommended sigma_b = m/20)."""
    return sampled / 20.0


def adaptive_update_noise(noise_multiplier: float, sampled: int) -> float:
    """The update's noise multiplier z_delta under adaptive clipping, so that the update and the
    count together cost exactly noise multiplier z: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2
    (Andrew et al. 2021, Theorem 1). Needs z < 2 sigma_b: the count alone, released with noise
    sigma_b, already costs as much as noise multiplier 2 sigma_b, so a smaller total is impossible.
    Raises :class:`ValueError` with the figures otherwise; z = 0 (no privacy) returns 0."""
    z = noise_multiplier
    if z <= 0:
        return 0.0
    sigma_b = adaptive_count_std(sampled)
    if z >= 2 * sigma_b:
        raise ValueError(
            f"adaptive clipping cannot spend noise multiplier z = {z:.4g} with {sampled} clients a round: the "
            f"clip count's noise (std m/20 = {sigma_b:.4g}) alone costs noise multiplier 2 * m/20 = {2 * sigma_b:.4g}, "
            f"so z must be below it. Sample more than 10 * z = {10 * z:.4g} clients a round, use "
            "privacy.client_clipping = 'fixed', or allow more privacy loss (a larger target epsilon, a smaller z)"
        )
    return (z**-2 - (2 * sigma_b) ** -2) ** -0.5


def sampled_per_round(cfg: FedLoraConfig) -> int:
    f = cfg.federation
    return min(f.num_clients, max(int(f.num_clients * f.fraction_train), f.min_train_clients))


def client_noise_for_target(cfg: FedLoraConfig) -> float:
    """Smallest z (bisection, 1e-3 relative) with which the whole run spends at most the target epsilon."""
    return _calibrate_client_noise(
        cfg.federation.num_clients,
        sampled_per_round(cfg),
        cfg.run.rounds,
        cfg.privacy.client_target_epsilon,
        cfg.client_delta(),
    )


@lru_cache(maxsize=32)
def _calibrate_client_noise(n: int, m: int, t: int, target: float, delta: float) -> float:
    # Cached: a run's start checks the target (simulate, the ServerApp) and the server's DP layer then
    # calibrates with it, the same question each time; one bisection is some fifty accountant evaluations.
    if client_epsilon(MAX_NOISE, m, n, t, delta) > target:
        raise ConfigError(
            f"invalid config value for 'privacy.client_target_epsilon': {target} cannot be met with {t} rounds of "
            f"{m} of {n} clients (delta {delta:.3g}) even at noise multiplier {MAX_NOISE:g}; sample fewer clients per "
            "round, run fewer rounds, or accept a larger epsilon"
        )
    lo, hi = 0.0, MAX_NOISE
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if mid > 0 and client_epsilon(mid, m, n, t, delta) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def example_noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """DP-SGD noise multiplier for ``steps`` Poisson-sampled steps at ``sample_rate`` (Opacus)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        z = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    except ValueError as exc:
        raise ConfigError(
            f"invalid config value for 'privacy.example_target_epsilon': {target_epsilon} cannot be met "
            f"with {steps} steps at sampling rate {sample_rate:.3g}: {exc}"
        ) from None
    if z > MAX_NOISE:
        raise ConfigError(
            f"invalid config value for 'privacy.example_target_epsilon': {target_epsilon} needs noise "
            f"multiplier {z:.1f} (> {MAX_NOISE:g}) over {steps} steps at sampling rate "
            f"{sample_rate:.3g}; run fewer steps or accept a larger epsilon"
        )
    return float(z)


def example_epsilon(history: list, delta: float) -> float:
    """Epsilon of a DP-SGD history [(noise, sample_rate, steps), ...] (Opacus RDP accountant)."""
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta))


def check_client_targets(cfg: FedLoraConfig) -> None:
    """When a run starts (server set-up, before any round): client-level DP's target epsilon can be
    met with the run's rounds and sampling (the calibration raises ConfigError otherwise), and adaptive
    clipping can split the calibrated z between the update and the count (Andrew et al.'s
    z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 needs z < 2 sigma_b = m/10)."""
    p = cfg.privacy
    if not p.client_dp or not (p.client_target_epsilon > 0 or p.client_clipping == "adaptive"):
        return
    z = client_noise_for_target(cfg) if p.client_target_epsilon > 0 else p.client_noise_multiplier
    if p.client_clipping == "adaptive":
        try:
            adaptive_update_noise(z, sampled_per_round(cfg))
        except ValueError as exc:
            raise ConfigError(f"invalid config value for 'privacy.client_clipping': {exc}") from None


def check_targets(cfg: FedLoraConfig) -> None:
    """Every privacy target of a simulated run, checked before its first round."""
    check_client_targets(cfg)
    check_example_targets(cfg)


def check_example_targets(cfg: FedLoraConfig) -> None:
    """Before any training: every client's DP-SGD target epsilon can be met with its own data size
    (the simulation driver knows every partition; a deployed client checks its own at setup)."""
    if not (cfg.privacy.example_dp and cfg.privacy.example_target_epsilon > 0):
        return
    # lazy: pulls in torch, which this module does not need otherwise
    from fedlora.partitions import client_data

    tc = cfg.train
    for i in range(cfg.federation.num_clients):
        n = len(client_data(cfg, i).train)
        steps = cfg.run.rounds * steps_per_round(n, tc.batch_size, tc.local_steps, tc.local_epochs)
        example_noise_for_target(
            cfg.privacy.example_target_epsilon, cfg.privacy.example_delta, example_sample_rate(n, tc.batch_size), steps
        )


def example_sample_rate(num_examples: int, batch_size: int) -> float:
    """DP-SGD's Poisson sampling rate: a batch of ``batch_size`` expected out of ``num_examples``."""
    return min(1.0, batch_size / max(num_examples, 1))


def steps_per_round(num_examples: int, batch_size: int, local_steps: int, local_epochs: int) -> int:
    return local_steps or local_epochs * math.ceil(num_examples / batch_size)

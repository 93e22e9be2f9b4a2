"""The ``[privacy]`` section: client-level DP (DP-FedAvg) and example-level DP-SGD settings, and
the rules that tie them to the rest of a run. The noise calibration for a target epsilon is not
here: it runs when a run starts (:func:`fedlora.privacy.accounting.check_targets`)."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.schema import ConfigError, _meta, _require


@dataclass
class PrivacySection:
    client_dp: bool = _meta(
        "Client-level DP (DP-FedAvg): clip each accepted update to client_clip, average over the sampled "
        "clients, add Gaussian noise of std client_noise_multiplier * clip / sampled; accounted over rounds.",
        default=False,
    )
    client_noise_multiplier: float = _meta(
        "z of the client-level Gaussian mechanism (ignored when client_target_epsilon > 0).", default=1.0
    )
    client_target_epsilon: float = _meta("Calibrate z so the whole run spends this epsilon (0 = use z).", default=0.0)
    client_clip: float = _meta(
        "L2 bound C on a client's update (the initial bound under adaptive clipping).", default=0.1
    )
    client_clipping: str = _meta(
        "'fixed' or 'adaptive' (Andrew et al. 2021: C tracks a quantile of update norms).", default="fixed"
    )
    adaptive_quantile: float = _meta("Adaptive clipping: target share of clients whose update is under C.", default=0.5)
    adaptive_lr: float = _meta("Adaptive clipping: geometric learning rate of C.", default=0.2)
    delta: float = _meta("Client-level delta (0 = 1 / num_clients^1.1).", default=0.0)
    example_dp: bool = _meta(
        "Example-level DP-SGD on each client (Opacus, Poisson sampling, per-sample clipping).", default=False
    )
    example_noise_multiplier: float = _meta(
        "DP-SGD noise multiplier (ignored when example_target_epsilon > 0).", default=1.0
    )
    example_target_epsilon: float = _meta(
        "Calibrate DP-SGD noise so a client taking part in every round spends "
        "this epsilon over the run (0 = use the noise multiplier).",
        default=0.0,
    )
    example_clip: float = _meta("DP-SGD per-sample gradient bound.", default=1.0)
    example_delta: float = _meta("DP-SGD delta.", default=1e-5)
    noise_seed: int = _meta(
        "-1: noise from the operating system's randomness (use this); >= 0: reproducible noise, for tests only.",
        default=-1,
    )

    def validate(self) -> None:
        for key in ("client_noise_multiplier", "example_noise_multiplier"):
            _require(getattr(self, key) >= 0, f"privacy.{key}", f"must be >= 0, got {getattr(self, key)}")
        for key in ("client_clip", "example_clip"):
            _require(getattr(self, key) > 0, f"privacy.{key}", f"a clip bound must be > 0, got {getattr(self, key)}")
        for key in ("client_target_epsilon", "example_target_epsilon"):
            _require(getattr(self, key) >= 0, f"privacy.{key}", "must be >= 0 (0 = off)")
        _require(
            self.client_clipping in ("fixed", "adaptive"), "privacy.client_clipping", "must be 'fixed' or 'adaptive'"
        )
        _require(0 < self.adaptive_quantile < 1, "privacy.adaptive_quantile", "must be in (0, 1)")
        _require(self.adaptive_lr > 0, "privacy.adaptive_lr", "must be > 0")
        _require(0 <= self.delta < 1, "privacy.delta", "must be in [0, 1) (0 = 1 / num_clients^1.1)")
        _require(0 < self.example_delta < 1, "privacy.example_delta", "must be in (0, 1)")


def check_with_run(cfg, policy) -> None:
    """What client-level DP cannot protect in this run, refused on load. Whether a target epsilon can
    be met (the calibration) is checked when the run starts: :func:`fedlora.privacy.accounting.check_targets`."""
    p, name = cfg.privacy, cfg.federation.strategy
    if p.client_dp:
        if policy.merge_global_into_base:
            raise ConfigError(
                f"invalid config for 'privacy.client_dp': {name} publishes every sampled client's factors side "
                "by side in the stacked adapter; there is no sum to add noise to, so client-level DP cannot "
                "protect it (example-level DP-SGD, privacy.example_dp, can)"
            )
        if name == "flexlora":
            raise ConfigError(
                "invalid config for 'privacy.client_dp': flexlora redistributes an SVD of the summed products, "
                "which the factor-space Gaussian mechanism does not cover; use fedit, ffa, fedsa or hetlora "
                "with client-level DP (or privacy.example_dp with flexlora)"
            )
        n = cfg.federation.num_clients
        if p.delta and p.delta >= 1.0 / n:
            raise ConfigError(
                f"invalid config value for 'privacy.delta': {p.delta} must be below 1 / num_clients "
                f"(= {1.0 / n:.3g}); a delta that large allows releasing one client's data outright"
            )
        if cfg.robust.aggregation != "mean":
            raise ConfigError(
                "invalid config for 'privacy.client_dp': the Gaussian mechanism is analysed for the "
                "clipped mean; robust.aggregation must be 'mean'"
            )

"""Client-level differential privacy (DP-FedAvg; with DyLoRA, DP-DyLoRA) on the server.

Each round, every accepted update is turned into its change from what that client started the
round with, in effective form over the parts its strategy shares (FedIT: A and s*B and the head;
FFA-LoRA: s*B and the head; FedSA-LoRA: A only, the private B never leaves the client and is
never released; HetLoRA: zero-padded to the global rank). Each change is clipped to L2 norm C,
the clipped changes are summed, divided by the number m of clients sampled (a fixed denominator,
so a dropped reply does not change the sensitivity), and Gaussian noise of std z*C/m is added to
every released coordinate. The new global adapter is the old one plus that noisy mean: the
strategy's own weighting (example counts, HetLoRA's norm-based weights) is data-dependent and is
not used under DP; every client weighs the same. Under DyLoRA the round's release is the leading
rank-b block only, and only it is noised; the rest of the adapter is not touched.

Adaptive clipping follows Andrew et al. (2021, Algorithm 1) and TF Privacy's
``QuantileAdaptiveClipSumQuery``: each round counts the clients whose update norm is *at or under*
the round's C, releases that count with noise of std sigma_b = m/20, noises the sum with the
*round's own* C (the bound the updates were clipped to, which is what the sum's sensitivity is),
and only then moves C geometrically towards the ``adaptive_quantile`` of norms for the next round.
The update noise is z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2, so count and update together cost
exactly noise multiplier z, which is what is accounted; z >= 2 sigma_b cannot be split this way and
is refused (at config load for the configured cohort, and here for a round that sampled fewer).
Flower 1.42's ``DifferentialPrivacyServerSideAdaptiveClipping`` differs: it counts the *clipped*
updates and adds the noise with the C already updated for the next round. fedlora keeps the
paper's form because noise must be scaled to the bound that actually clipped the sum: with
Flower's order, a round in which C shrinks is noised for a smaller sensitivity than it had.

Accounting: Flower's ``RdpAccountant`` (see :mod:`fedlora.privacy.accounting`), composed once per
released round; its state is part of the strategy's state.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any

import torch

from fedlora.config import FedLoraConfig
from fedlora.extensions import Extension
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import fit_rank, flatten, to_effective, unflatten
from fedlora.privacy import accounting
from fedlora.registry import register_extension


def effective_change(start: LoraFactors, update: LoraFactors, rank: int) -> LoraFactors:
    """``update - start`` in effective form, both at the update's rank, zero-padded to ``rank``.

    The start is converted to effective form at its own rank *before* it is cut to the update's
    rank: a DyLoRA block of rank b is decoded with the full adapter's per-component scaling
    (alpha/r, see :func:`fedlora.lora_math.block`), and cutting first would rescale the start by
    alpha/b instead (an idle client would then contribute -(r/b - 1) * B_eff[:, :b]).
    :func:`fedlora.robust.update_norm` measures the same change the same way."""
    r = next(iter(update.modules.values())).rank if update.modules else rank
    u, s0 = to_effective(update), fit_rank(to_effective(start), max(r, 1))
    out = LoraFactors(extras={k: t - s0.extras[k] for k, t in u.extras.items()})
    for name, m in u.modules.items():
        b0 = s0.modules[name]
        out.modules[name] = ModuleFactors(
            A=None if m.A is None else m.A - b0.A[:r], B=None if m.B is None else m.B - b0.B[:, :r], alpha=float(r)
        )
    return fit_rank(out, rank)


def add_to_block(global_eff: LoraFactors, change: LoraFactors, rank: int) -> LoraFactors:
    """``global_eff`` with ``change`` added to its leading ``rank`` components (and the head)."""
    out = LoraFactors(
        extras={k: t + change.extras[k] if k in change.extras else t for k, t in global_eff.extras.items()}
    )
    for name, m in global_eff.modules.items():
        c = change.modules.get(name)
        A, B = m.A, m.B
        if c is not None and c.A is not None:
            A = A.clone()
            A[:rank] += c.A
        if c is not None and c.B is not None:
            B = B.clone()
            B[:, :rank] += c.B
        out.modules[name] = ModuleFactors(A=A, B=B, alpha=m.alpha)
    return out


FAR_BEYOND = 10.0  # "clients-far-beyond-clip" counts updates over this many times the round's clip


class ClientLevelDP:
    """The Gaussian mechanism on the clipped mean of client updates, with its accountant."""

    def __init__(self, cfg: FedLoraConfig) -> None:
        p = cfg.privacy
        self.cfg = cfg
        self.num_clients = cfg.federation.num_clients
        self.delta = cfg.client_delta()
        self.noise_multiplier = (
            accounting.client_noise_for_target(cfg) if p.client_target_epsilon > 0 else p.client_noise_multiplier
        )
        self.clip = p.client_clip
        self.adaptive = p.client_clipping == "adaptive"
        self.accountant = accounting.client_accountant(self.num_clients, self.delta)
        self.released = 0

    # -------------------------------------------------------------------- state (checkpointable)
    def state_dict(self) -> dict:
        return {
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "released": self.released,
            "accountant": self.accountant.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.clip = float(state["clip"])
        self.noise_multiplier = float(state["noise_multiplier"])
        self.released = int(state["released"])
        self.accountant.load_state_dict(state["accountant"])

    def epsilon(self) -> float:
        return float(self.accountant.get_epsilon(self.delta)) if self.released else 0.0

    # -------------------------------------------------------------------- one round
    def _generator(self, server_round: int) -> torch.Generator:
        seed = self.cfg.privacy.noise_seed
        return torch.Generator().manual_seed(seed * 1_000_003 + server_round if seed >= 0 else secrets.randbits(63))

    def begin(self, sampled: int, server_round: int, rank: int) -> ClippedSum:
        """A round's release, folded one client at a time: ``add`` clips each change into the running
        sum, ``finish`` adds the noise once and accounts the round."""
        return ClippedSum(self, sampled, server_round, rank)

    def release(
        self,
        global_eff: LoraFactors,
        starts: list[LoraFactors],
        updates: list[LoraFactors],
        sampled: int,
        server_round: int,
        rank: int,
    ) -> tuple[LoraFactors, dict]:
        """The new global adapter and what the round spent: ``global + mean(clip(change)) + noise``
        (the fold of :meth:`begin` over a list)."""
        release = self.begin(sampled, server_round, rank)
        for start, update in zip(starts, updates):
            release.add(start, update)
        return release.finish(global_eff)


class ClippedSum:
    """One round of the Gaussian mechanism as a fold: the running sum of clipped changes (float64,
    one adapter's worth) and the norms seen; the noise is drawn and the round accounted at
    :meth:`finish`, with the same generator stream as a batch release would use."""

    def __init__(self, dp: ClientLevelDP, sampled: int, server_round: int, rank: int) -> None:
        self.dp, self.sampled, self.server_round, self.rank = dp, sampled, server_round, rank
        self.clip = dp.clip  # the round's own bound: the one the sum's sensitivity is
        self.total: torch.Tensor | None = None
        self.layout: tuple | None = None  # (keys, shapes, alpha) of the flattened change
        self.norms: list[float] = []

    @property
    def count(self) -> int:
        return len(self.norms)

    def add(self, start: LoraFactors, update: LoraFactors) -> None:
        keys, shapes, alpha, rows = flatten([effective_change(start, update, self.rank)])
        if self.layout is not None and (keys, shapes) != self.layout[:2]:
            raise ValueError("the update's change carries different tensors than the changes folded before it")
        row = rows[0].double()
        n = float(row.norm())
        if self.total is None:
            self.total, self.layout = torch.zeros_like(row), (keys, shapes, alpha)
        self.total.add_(row, alpha=min(1.0, self.clip / n) if n > 0 else 1.0)
        self.norms.append(n)

    def finish(self, global_eff: LoraFactors) -> tuple[LoraFactors, dict]:
        """The new global adapter and what the round spent: ``global + (sum + noise) / m``."""
        if self.total is None:
            raise ValueError("client-level DP needs at least one accepted update to release")
        dp, norms, clip = self.dp, self.norms, self.clip
        m = max(self.sampled, len(norms))
        gen = dp._generator(self.server_round)
        z = dp.noise_multiplier
        info = {
            "client-clip": clip,
            "client-noise-multiplier": z,
            "client-update-norm-mean": sum(norms) / len(norms),
            "clients-clipped": sum(n > clip for n in norms),
            # An update 10x past C is no honest client's drift: the clip held it, and the log says so.
            "clients-far-beyond-clip": sum(n > FAR_BEYOND * clip for n in norms),
        }
        next_clip = clip
        if dp.adaptive:
            count_std = accounting.adaptive_count_std(m)
            z_delta = accounting.adaptive_update_noise(z, m)  # raises before anything is released or spent
            under = sum(n <= clip for n in norms) + float(torch.randn((), generator=gen)) * count_std
            p = dp.cfg.privacy
            next_clip = clip * math.exp(-p.adaptive_lr * (under / m - p.adaptive_quantile))
            z = z_delta
            info["client-clip-next"] = next_clip
            info["client-update-noise-multiplier"] = z_delta
            info["client-count-noise-std"] = count_std
        noise = torch.randn(self.total.shape, generator=gen, dtype=torch.float32).double() * (z * clip)
        mean = ((self.total + noise) / m).to(torch.float32)
        keys, shapes, alpha = self.layout
        new = add_to_block(global_eff, unflatten(mean, keys, shapes, alpha), self.rank)
        dp.clip = next_clip
        if dp.noise_multiplier > 0:
            dp.accountant.compose(accounting.client_event(dp.noise_multiplier, self.sampled, dp.num_clients))
            dp.released += 1
        info["client-epsilon"] = dp.epsilon() if dp.noise_multiplier > 0 else math.inf
        info["client-delta"] = dp.delta
        return new, info


@register_extension
class ClientLevelPrivacy(Extension):
    """Client-level DP on the server (``privacy.client_dp``): checks the run can meet its target at
    start, releases every round through :class:`ClippedSum` instead of the strategy's fold, keeps the
    mechanism's clip and accountant in the checkpoint and reports the epsilon spent."""

    name = "client-dp"
    order = 30
    releases_round = True

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self._mechanism: ClientLevelDP | None = None

    @property
    def mechanism(self) -> ClientLevelDP:
        """The Gaussian mechanism and its accountant (built on the server, when first used)."""
        if self._mechanism is None:
            self._mechanism = ClientLevelDP(self.cfg)
        return self._mechanism

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return cfg.privacy.client_dp

    def start_run(self) -> None:
        accounting.check_client_targets(self.cfg)

    def round_release(self, server_round: int, sampled: int, rank: int) -> ClippedSum:
        return self.mechanism.begin(sampled, server_round, rank)

    def server_state(self) -> dict:
        return self.mechanism.state_dict()

    def load_server_state(self, state: dict) -> None:
        if state:
            self.mechanism.load_state_dict(state)

    def finish_run(self, rows: list[dict], folder: Path) -> dict[str, Any]:
        dp = self.mechanism
        return {
            "privacy": {
                "client-level": {
                    "epsilon": dp.epsilon() if dp.noise_multiplier > 0 else None,
                    "delta": dp.delta,
                    "noise-multiplier": dp.noise_multiplier,
                    "released-rounds": dp.released,
                    "accountant": "flwr RdpAccountant (sampling without replacement, replace-one)",
                }
            }
        }

"""Example-level DP-SGD on a client: Opacus' ``PrivacyEngine`` as a hook on the one training loop.

Only the trainable parameters (LoRA factors and, where the strategy trains it, the head) get
per-sample gradients; the frozen base never does. Batches are Poisson-sampled (Opacus'
``DPDataLoader``, seeded per client and round); an empty batch on a small client is still a noisy
step (zero clipped sum plus noise), so the accountant counts every step and nothing crashes. The
accountant's history is stored in the client-state store, so epsilon accumulates over every round
the client takes part in and survives a restart.

Guard against silent corruption (Opacus issue #820, LoRA + PEFT trained with Opacus looked fine and
was useless): :func:`check_per_sample_gradients` asserts every trainable tensor got a per-sample
gradient of shape [batch, *shape]; the tests check the factors move and the model learns.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedlora.data import Examples, collate
from fedlora.extensions import ClientRound, Extension
from fedlora.privacy.accounting import example_epsilon, example_noise_for_target, example_sample_rate, steps_per_round
from fedlora.registry import register_extension
from fedlora.training import TrainContext, TrainingHook

if TYPE_CHECKING:
    from fedlora.config import FedLoraConfig

STATE_NAME = "dp-sgd-accountant"


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int]:
        return (i,)  # Opacus reads the structure of one item to shape empty batches


class DPSGDHook(TrainingHook):
    """Wraps the loop's model, optimizer and batches with Opacus; reports epsilon at the end."""

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        history: list | None = None,
        noise_seed: int | None = None,
    ) -> None:
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.delta = delta
        self.history = [tuple(h) for h in (history or [])]
        self.noise_seed = noise_seed
        self.engine = None
        self.empty_steps = 0
        self._params: list[torch.nn.Parameter] = []

    @staticmethod
    def sample_rate(num_examples: int, batch_size: int) -> float:
        return example_sample_rate(num_examples, batch_size)

    def begin(self, ctx: TrainContext) -> None:
        import warnings

        from opacus import PrivacyEngine

        # Noise comes from a torch generator seeded from the OS (secrets), not Opacus' secure_mode
        # (which needs torchcsprng); the backward-hook notice concerns the frozen embeddings' inputs.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")

        data: Examples = ctx.data
        n, bs = len(data), ctx.tc.batch_size
        gen = torch.Generator().manual_seed(ctx.seed)
        loader = torch.utils.data.DataLoader(
            _Indices(n),
            batch_size=min(bs, n),
            shuffle=False,
            generator=gen,
            collate_fn=lambda items: collate(data, [int(i[0]) for i in items]),
        )
        noise_gen = torch.Generator(device=ctx.device)
        noise_gen.manual_seed(self.noise_seed if self.noise_seed is not None else secrets.randbits(63))
        self.engine = PrivacyEngine(accountant="rdp")
        self.engine.accountant.history = list(self.history)
        model, optimizer, dp_loader = self.engine.make_private(
            module=ctx.model,
            optimizer=ctx.optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_gen,
            grad_sample_mode="hooks",
        )
        ctx.model, ctx.optimizer = model, optimizer
        ctx.clip_grad = False  # per-sample clipping replaces the global clip
        # One pass of the DP loader is 1/q Poisson steps: the loop's step budget is unchanged.
        ctx.batch_source = lambda epoch: (_as_batch(item) for item in dp_loader)
        self._params = [p for p in ctx.params if p.requires_grad]

    def empty_batch(self, ctx: TrainContext) -> None:
        """A noisy step with no examples: clipped sum zero, noise added, the accountant counts it."""
        ctx.optimizer.zero_grad(set_to_none=True)
        for p in self._params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        ctx.optimizer.step()
        self.empty_steps += 1

    def close(self, ctx: TrainContext) -> None:
        # Unwrap: the cached PEFT model must not keep Opacus' hooks (or per-sample gradients) for
        # the next message, also when training failed.
        if hasattr(ctx.model, "_close"):
            ctx.model._close()
        for p in self._params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)

    def end(self, ctx: TrainContext) -> dict:
        self.history = [tuple(h) for h in self.engine.accountant.history]
        return {
            "dp-sgd-epsilon": self.epsilon(),
            "dp-sgd-noise": self.noise_multiplier,
            "dp-sgd-empty-steps": self.empty_steps,
        }

    def epsilon(self) -> float:

        return example_epsilon(self.history, self.delta)


def _as_batch(item):
    """Opacus hands an empty Poisson batch as empty tensors of the learned structure (or nothing)."""
    if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], dict):
        return None
    batch, labels = item
    return None if labels.numel() == 0 else (batch, labels)


def check_per_sample_gradients(params: list[torch.nn.Parameter], batch_size: int) -> None:
    """Every trainable tensor has a per-sample gradient of shape [batch, *shape] (Opacus #820)."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise RuntimeError(f"a trainable tensor of shape {tuple(p.shape)} got no per-sample gradient")
        if isinstance(gs, list):
            gs = torch.cat(gs)
        if tuple(gs.shape) != (batch_size, *p.shape):
            raise RuntimeError(f"per-sample gradient of shape {tuple(gs.shape)}, expected {(batch_size, *p.shape)}")


@register_extension
class ExampleLevelDP(Extension):
    """DP-SGD on the clients (``privacy.example_dp``): the hook above on the client's training, its
    noise calibrated to ``privacy.example_target_epsilon`` when one is set, and its accountant's
    history kept in the client-state store after a successful round."""

    name = "dp-sgd"
    order = 15  # before the continual methods' loss terms: they see the model Opacus wraps

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return cfg.privacy.example_dp

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list[TrainingHook]]:
        p, tc = client.cfg.privacy, client.cfg.train
        n = len(client.data.train)
        rate = DPSGDHook.sample_rate(n, tc.batch_size)
        z = p.example_noise_multiplier
        if p.example_target_epsilon > 0:
            # Calibrated for a client that takes part in every round: a conservative bound for the others.
            steps = client.cfg.run.rounds * steps_per_round(n, tc.batch_size, tc.local_steps, tc.local_epochs)
            z = example_noise_for_target(p.example_target_epsilon, p.example_delta, rate, steps)
        seed = None if p.noise_seed < 0 else p.noise_seed * 7919 + client.server_round * 31 + client.partition_id
        history = client.store.load(client.client_id, STATE_NAME, {"history": []})["history"]
        hook = DPSGDHook(z, p.example_clip, p.example_delta, history=history, noise_seed=seed)
        yield [hook]
        client.store.save(
            client.client_id,
            STATE_NAME,
            {"history": [list(x) for x in hook.history], "delta": hook.delta, "epsilon": hook.epsilon()},
        )

    def round_figures(self, accepted: list[dict[str, Any]]) -> dict[str, Any]:
        eps = [m["dp-sgd-epsilon"] for m in accepted if "dp-sgd-epsilon" in m]
        return {"dp-sgd-epsilon-max": max(eps)} if eps else {}

    def finish_run(self, rows: list[dict], folder: Path) -> dict[str, Any]:
        eps = [r["dp-sgd-epsilon-max"] for r in rows if r.get("dp-sgd-epsilon-max") is not None]
        return {
            "privacy": {
                "example-level": {
                    "epsilon-max-over-clients": max(eps) if eps else None,
                    "delta": self.cfg.privacy.example_delta,
                    "accountant": "opacus RDPAccountant",
                }
            }
        }

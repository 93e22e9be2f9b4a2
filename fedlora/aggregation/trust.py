"""Trust scores from the server's own examples (``robust.trust_examples``, opt-in), after FLTrust
(Cao, Fang, Liu and Gong, NDSS 2021).

When a train round's replies start to arrive, the server trains on its examples (held out of the
split it evaluates on, or of every client's partition: ``robust.trust_data``,
:func:`fedlora.data.hold_out_trust`) from the global adapter, with the run's
train settings and the one training loop (:func:`fedlora.training.train_local`), for as many steps
as a client of the median declared size takes (``train.local_steps``, or ``train.local_epochs``
passes over that size: FLTrust's server runs the clients' local iterations), and keeps its update
``g0`` (effective form, shared parts). Each accepted reply, as it arrives and after the robust
layer's bounds, gets FLTrust's trust score ``t = max(0, cos(update, g0))``: a reply with ``t = 0`` is
left out of the fold and named; any other weighs its bounded example count times ``t`` and is named
with both figures.

By default it differs from FLTrust: FLTrust rescales every kept update to ``||g0||`` and weighs it
by ``t`` alone. On the default task honest updates are nearly orthogonal, so that mean of rescaled
directions moves the global adapter much less than FedIT's mean does (the attack benchmark's
``honest trust`` and ``honest trust fltrust`` cells), so here the update keeps the robust layer's
norm bound and example-count weight and ``t`` multiplies the weight: the weighted mean is FedIT's
own when every score is equal. ``robust.trust_action = "fltrust"`` is FLTrust's own form (the robust
layer's relative bound and weight cap are then off: the rescaling and ``t`` replace them);
``"report"`` scores every reply and changes nothing (the scores in the round's row, the replies a
score of 0 would leave out flagged).

What it holds: the model and one vector of the shared parts' size; a reply is scored and passed
on at once, so memory stays flat in the cohort and a reply's weight does not depend on arrival
order. Like FLTrust it assumes the server's examples are clean and drawn from the task the clients
learn; on non-IID data it weighs most the clients whose updates point where the server's does.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from fedlora.extensions import Extension, GlobalAdapter, ReplyStage
from fedlora.registry import register_extension
from fedlora.schema import ConfigError

if TYPE_CHECKING:
    from fedlora.aggregation.update import Update
    from fedlora.config import FedLoraConfig
    from fedlora.protocol import NodeProfile
    from fedlora.strategies.round_log import RoundLog

log = logging.getLogger("fedlora.server")


def trust_score(change: torch.Tensor, reference: torch.Tensor) -> float:
    """``max(0, cos(change, reference))``; 0 when either is the zero vector (no direction to trust)."""
    a, b = change.double(), reference.double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return 0.0
    return max(0.0, float(a @ b) / (na * nb))


class ServerUpdate:
    """The server's own round of training on its trust examples: a model built once, loaded each
    round with what a client of the reference rank starts from."""

    def __init__(self, cfg: FedLoraConfig) -> None:
        from fedlora.data import load_task
        from fedlora.model import AdapterSpec, build_peft_model, place
        from fedlora.training import pick_device

        self.cfg = cfg
        task = load_task(cfg)
        if task.trust is None:  # an extension decided the data (refused on load): nothing to train on
            raise ConfigError("robust.trust_examples: the run's data holds no examples for the server")
        self.examples = task.trust
        where = (
            f"held out of the evaluation split, which the server evaluates on without them ({len(task.test)} examples)"
            if cfg.robust.trust_data == "eval"
            else "held out of the training split, before it is partitioned"
        )
        log.info("robust.trust_examples: the server holds %d examples, %s", len(self.examples), where)
        self.device = pick_device(cfg.train.device)
        self.model: torch.nn.Module | None = None
        self._build = lambda rank: place(
            build_peft_model(cfg, task.num_labels, AdapterSpec.for_rank(cfg, rank), task.label_names), self.device
        )

    def profile(self, run: GlobalAdapter) -> NodeProfile:
        """The profile the server trains as: the reference rank, its alpha, its own examples."""
        from fedlora.protocol import NodeProfile

        rank = run.max_rank
        return NodeProfile(
            node_id=0,
            client_id="server",
            partition_id=-1,
            rank=rank,
            alpha=self.cfg.lora.alpha_for_rank(rank),
            num_train=len(self.examples),
            num_test=0,
        )

    def steps(self, run: GlobalAdapter) -> int:
        """A client's local steps at the median declared training-set size (the profiles' median, so
        no minority of size claims moves it)."""
        tc = self.cfg.train
        if tc.local_steps:
            return tc.local_steps
        sizes = sorted(p.num_train for p in run.profiles.values()) or [len(self.examples)]
        return tc.local_epochs * math.ceil(sizes[len(sizes) // 2] / tc.batch_size)

    def __call__(self, run: GlobalAdapter, server_round: int, steps: int) -> torch.Tensor:
        """The server's update this round after ``steps`` steps (:meth:`steps`), as
        :func:`fedlora.robust.update_change` lays out its shared parts."""
        from fedlora.factors import extract_factors, load_factors
        from fedlora.model import initial_factors, set_trainable
        from fedlora.robust import update_change
        from fedlora.training import train_local

        prof = self.profile(run)
        if self.model is None:
            self.model = self._build(prof.rank)
        start = run.round_start(prof, server_round)
        load_factors(self.model, initial_factors(self.model, self.cfg.lora.init_seed).merged_with(start))
        params = set_trainable(self.model, run.sharing_policy.trained)
        train_local(
            self.model,
            params,
            self.examples,
            replace(self.cfg.train, local_steps=steps),
            seed=self.cfg.run.seed * 100_003 + server_round * 1009 - 1,  # the clients' formula, partition -1
            device=self.device,
        )
        trained = extract_factors(self.model).select(run.sharing_policy.shared)
        return update_change(start, trained)


class TrustStage:
    """One round's replies, each scored against the server's update ``reference`` and passed on."""

    def __init__(
        self, run: GlobalAdapter, rl: RoundLog, reference: torch.Tensor | None, examples: int, action: str
    ) -> None:
        self.run, self.rl, self.reference, self.examples, self.action = run, rl, reference, examples, action
        self.scores: dict[str, float] = {}

    def offer(self, update: Update) -> list[Update]:
        from fedlora.robust import scale_update, update_change

        if self.reference is None:
            return [update]
        start = self.run.round_start(update.profile, self.rl.server_round)
        change = update_change(start, update.factors)
        score = trust_score(change, self.reference)
        who = f"client {update.profile.client_id}"
        self.scores[update.profile.client_id] = score
        what = f"the server's update on its {self.examples} examples (robust.trust_examples)"
        if self.action == "report":
            if score <= 0.0:
                self.rl.flagged.append(
                    f"{who}: trust 0: its update has no positive cosine with {what}; folded as it came "
                    "(robust.trust_action = 'report')"
                )
            return [update]
        if score <= 0.0:
            self.rl.reject(
                f"{who} (node {update.profile.node_id}): trust 0: its update has no positive cosine with {what}; "
                "left out of the fold"
            )
            return []
        if self.action == "weigh":
            self.rl.clipped.append(
                f"{who}: weight {update.weight:.4g} x trust {score:.3g} = {update.weight * score:.4g} (cosine with {what})"
            )
            update.weight *= score
            return [update]
        g0, norm = float(self.reference.double().norm()), float(change.double().norm())
        self.rl.clipped.append(
            f"{who}: trust {score:.3g} (cosine with {what}): weight {score:.3g} in place of {update.weight:g} "
            f"examples, update norm {norm:.4g} rescaled to the server's {g0:.4g} (robust.trust_action = 'fltrust')"
        )
        update.factors = scale_update(start, update.factors, g0 / norm)
        update.weight = score
        return [update]

    def flush(self) -> list[Update]:
        return []

    def end(self) -> None:
        if self.reference is None:
            self.rl.flagged.append("robust.trust_examples: no server update this round; replies weighed untrusted")
        elif self.scores:
            self.rl.figures["trust-scores"] = dict(sorted(self.scores.items()))


@register_extension
class ServerTrust(Extension):
    """``robust.trust_examples`` > 0: the server's update each round (:class:`ServerUpdate`) and the
    stage that weighs every reply by its trust (:class:`TrustStage`)."""

    name = "trust"
    order = 6  # after the robust layer's bounds (order 5): trust weighs the bounded update

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self._server: ServerUpdate | None = None
        self._reference: tuple[int, torch.Tensor] | None = None  # (round, the server's update)

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return cfg.robust.trust_examples > 0

    def use_reference(self, reference: torch.Tensor, rl: RoundLog) -> None:
        """Score round ``rl.server_round``'s replies against ``reference`` (the server's update, in
        :func:`fedlora.robust.update_change`'s layout)."""
        self._reference = (rl.server_round, reference)
        rl.figures["trust-reference-norm"] = float(reference.norm())

    def reply_stage(self, run: GlobalAdapter, rl: RoundLog) -> ReplyStage | None:
        ref = self._reference
        if ref is None or ref[0] != rl.server_round:  # the server's own update, once per round
            if self._server is None:
                self._server = ServerUpdate(self.cfg)
            t0 = time.perf_counter()
            rl.figures["trust-server-steps"] = steps = self._server.steps(run)
            self.use_reference(self._server(run, rl.server_round, steps), rl)
            log.info(
                "round %d: the server's update on its %d trust examples (%d steps, %.1f s) has norm %.4g",
                rl.server_round,
                len(self._server.examples),
                steps,
                time.perf_counter() - t0,
                rl.figures["trust-reference-norm"],
            )
            ref = self._reference
        reference = ref[1] if ref is not None and float(ref[1].norm()) > 0 else None
        r = self.cfg.robust
        return TrustStage(run, rl, reference, r.trust_examples, r.trust_action)

"""Stage 2 of a round's aggregation: what one client's update may do to the global adapter.

``robust.update_norm_bound``: a client's update is its change from what it started the round
with, measured in effective form over the parts it shares (:func:`fedlora.robust.update_norm`);
above the bound it is scaled back onto it (``clip``) or dropped (``reject``), and named.
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING

from fedlora.aggregation.folds import Fold, KeepAll
from fedlora.aggregation.share_cap import ShareCapped
from fedlora.extensions import Extension, GlobalAdapter, ReplyStage
from fedlora.factors import LoraFactors
from fedlora.protocol import NodeProfile
from fedlora.registry import register_extension
from fedlora.robust import (
    clip_update,
    coordinate_median,
    direction_weights,
    drop_opposed,
    gram_matrix,
    spread_share,
    trimmed_mean,
    update_change,
    update_norm,
)
from fedlora.robust import median as median_of
from fedlora.schema import ConfigError
from fedlora.validation import RejectedReply

if TYPE_CHECKING:
    from fedlora.aggregation.update import Update
    from fedlora.config import FedLoraConfig
    from fedlora.strategies.round_log import RoundLog

log = logging.getLogger("fedlora.server")

# The direction bound needs this many replies: fewer cannot tell a shared direction from scatter
# (the spread of 3 or 4 cosines is no estimate of it).
DIRECTION_QUORUM = 5
# The floor of a client on probation (robust.direction_probation): its update must not lean away from the others'.
PROBATION_COSINE = 0.0


def _n_replies(n: int | None) -> str:
    """'1 reply', 'n replies': a count as the round log writes it."""
    return f"{n} {'reply' if n == 1 else 'replies'}"


def bound_update(run: GlobalAdapter, prof: NodeProfile, factors: LoraFactors, server_round: int, rl) -> LoraFactors:
    """``robust.update_norm_bound`` (off by default): the update clipped onto it, or refused above it."""
    bound = run.cfg.robust.update_norm_bound
    if bound <= 0:
        return factors
    start = run.round_start(prof, server_round)
    clipped, norm = clip_update(start, factors, bound)
    if norm > bound:
        if run.cfg.robust.norm_action == "reject":
            raise RejectedReply(f"update norm {norm:.4g} is above robust.update_norm_bound ({bound:g})")
        if rl is not None:
            rl.clipped.append(f"client {prof.client_id}: update norm {norm:.4g} clipped to {bound:g}")
    return clipped


class WeightCap:
    """``robust.max_weight_factor`` (on by default): a reply's aggregation weight (its example count)
    is at most that many times the median training-set size the federation's clients declared, so
    a client claiming a large data set inside every other cap cannot carry the round (the share cap,
    ``robust.max_client_share``, is the exact but opt-in form). Named when it applies."""

    def __init__(self) -> None:
        self._median: tuple[tuple[int, int], int] | None = None  # (the profiles it was taken over, median)

    def __call__(self, run: GlobalAdapter, prof: NodeProfile, examples: float, rl) -> float:
        factor = run.cfg.robust.max_weight_factor
        if factor <= 0 or not run.profiles or run.cfg.robust.trust_is_fltrust:  # trust weighs
            return float(examples)
        key = (len(run.profiles), sum(p.num_train for p in run.profiles.values()))
        if self._median is None or self._median[0] != key:  # once per change of the federation, not per reply
            sizes = sorted(p.num_train for p in run.profiles.values())
            self._median = (key, sizes[len(sizes) // 2])
        median = self._median[1]
        limit = factor * max(median, 1)
        if examples <= limit:
            return float(examples)
        if rl is not None:
            rl.clipped.append(
                f"client {prof.client_id}: weight {examples:g} examples capped at {limit:g} "
                f"(robust.max_weight_factor {factor:g} x the median declared size {median})"
            )
        return float(limit)


class MedianBounds:
    """What the round's own medians allow each accepted reply, whatever order the replies arrive in.

    Every bound here compares a reply's *size-normalised norm*: its update norm (its change from
    what it started the round with, effective form, shared parts) divided by n^p, n its aggregation
    weight (example count, after ``robust.max_weight_factor``) and p ``robust.norm_size_power``.
    Honest clients that train with AdamW at a fixed learning rate move about as far as the square
    root of their local steps, so their normalised norms lie close together where their plain
    norms spread widely (``benchmarks/update_geometry.py``): the bound can sit close above the
    honest clients without naming the large ones.

    * ``robust.relative_norm_bound`` (on by default, 1.5): no reply's normalised norm may exceed
      that many times the round's median; above it the update is clipped onto it (or rejected,
      ``robust.norm_action``) and the client named. It needs no absolute figure, so it suits any
      model and learning rate. A reply over n examples thus moves the global adapter by at most
      1.5 x the median's step for n examples: a boosted or sign-flipped update is held to about its
      honest size.
    * ``robust.relative_norm_reject`` (on by default, 10): a reply above that many times the round's
      median is left out of the fold and named rather than clipped: clipping would still give it the
      full pull the bound allows (four x1e6 sign flips of ten, clipped, reverse the round).
    * ``robust.weight_from_norm`` (on by default): a reply's weight is at most the example count its
      norm supports: below 1 / relative_norm_bound of the median ratio, the weight is cut to
      n x (ratio x bound)^(1/p) and the client named. A client that declares more examples than it
      trained on, or sends back (nearly) what it was given, cannot buy weight with the claim.
    * ``robust.min_cosine`` (on by default, -0.1): an update whose cosine similarity with the sum
      of the round's other (bounded) update directions is below it is left out of the fold and the
      client named; the lowest goes first and the others' cosines are taken again without it
      (:func:`fedlora.robust.drop_opposed`), so a cut update does not turn the reference against
      honest ones. Each direction (scaled to unit norm) weighs min(its examples, the round's
      median): neither a norm inside the bound nor a size claim over the median buys a larger say,
      so a minority of colluders cannot turn the reference, and a client of a few examples, whose
      direction is the noisiest, has less (why, and what passes it: docs/hostile-clients.md).
      Where the round's cosines scatter, ``robust.cosine_spread`` keeps a reply below
      ``min_cosine`` whose cosine is within the honest spread; such a reply keeps no more weight
      than the round's median times its cosine's place between the round's floor (0) and
      ``min_cosine`` (1), its update clipped to the norm bound at that weight, named: a reply just
      inside the floor has about the say of one just outside it, and a size claim buys say only
      for a direction that agrees with the others. One that only the quorum of five keeps (below
      the floor) keeps the median's weight.
    * ``robust.direction_probation`` (on by default, 2 rounds): for that many rounds after a client's
      update direction fell below ``min_cosine`` (left out, weighed down) or was left out on probation,
      the client's update is kept only if its cosine is at least 0 (:data:`PROBATION_COSINE`);
      neither min_cosine's margin nor the spread keeps it. :class:`RobustBounds` keeps the
      history (client id -> round), in the run's checkpoint.

    All need the whole round: every reply's normalised norm (a scalar) is kept, and the replies
    with the largest are held back while they fit ``robust.held_back_mb`` (at least one), each
    folded only when a larger one takes its place. When the replies end, the median of all sets
    the bounds for the held ones: every reply above the norm bound is bounded in any arrival order
    while no more exceed it than are held; past that, and for weights too small to check among
    those folded early, the round says how many. The direction check runs when the whole round
    was held, with at least 5 replies of one rank; otherwise the round log says it did not. Off
    under client-level DP: a threshold from other clients' updates would make each client's
    treatment depend on the others' data, which the Gaussian mechanism's analysis does not allow
    (its own clip C bounds every client there).

    ``offer`` takes an accepted update and returns those ready to fold (the one a larger reply
    displaced from the held set, if any); ``flush`` returns the held ones, bounded, when the
    round's replies end."""

    def __init__(self, run: GlobalAdapter, rl: RoundLog, probation: dict[str, int] | None = None) -> None:
        """``probation``: the clients held to :data:`PROBATION_COSINE` this round, each with its last round cut."""
        r = run.cfg.robust
        self.strategy, self.rl, self.server_round = run, rl, rl.server_round
        # Off where another stage decides norms and weights: client-level DP's release, FLTrust's form.
        self.factor = 0.0 if rl.released_by or r.trust_is_fltrust else r.relative_norm_bound
        self.power = r.norm_size_power
        self.reject_factor = r.relative_norm_reject  # applied with the norm bound (in _bounded)
        self.weigh = self.factor > 0 and self.power > 0 and r.weight_from_norm
        self.min_cosine = -1.0 if rl.released_by else r.min_cosine
        self.budget = r.held_back_mb * 2**20
        self.capacity: int | None = None  # replies that fit the budget, set by the first
        self.norms: list[float] = []  # every reply's normalised norm
        self.folded_norms: list[float] = []  # those of the replies folded before the bounds were known
        self._held: list[tuple[float, int, Update]] = []  # a min-heap on (normalised norm, arrival)
        self.reference: float | None = None
        self.probation = probation or {}
        self.cut_by_direction: list[str] = []  # client ids it cut this round: their probation (re)starts

    @property
    def active(self) -> bool:
        return self.factor > 0 or self.min_cosine > -1.0

    def offer(self, update: Update) -> list[Update]:
        if not self.active:
            return [update]
        if self.capacity is None:
            size = sum(t.numel() * t.element_size() for _, t in update.factors.tensors())
            self.capacity = max(1, int(self.budget // max(size, 1)))
        norm = update_norm(self._start(update), update.factors) / self._size(update)
        self.norms.append(norm)
        entry = (norm, len(self.norms), update)
        if len(self._held) < self.capacity:
            heapq.heappush(self._held, entry)
            return []
        smallest = heapq.heappushpop(self._held, entry)
        self.folded_norms.append(smallest[0])
        return [smallest[2]]

    def flush(self) -> list[Update]:
        if not self.active or not self.norms:
            return []
        held, self._held = [(n, u) for n, _, u in sorted(self._held, key=lambda e: e[1])], []
        if self.factor > 0:
            self.reference = ref = median_of(self.norms)
            if ref <= 0:  # most replies did not move: no ratio to the median exists, so neither bound can apply
                still = sum(1 for n in self.norms if n <= 0)
                self.rl.flagged.append(
                    f"robust.relative_norm_bound not applied: the round's median {self._what()} is 0 ({still} of "
                    f"{_n_replies(len(self.norms))} sent back what they were given)"
                )
            early = sum(1 for n in self.folded_norms if n > self.factor * ref)
            if early:
                self.rl.flagged.append(
                    f"{_n_replies(early)} above robust.relative_norm_bound ({self.factor:g}x the round's median "
                    f"{self._what()} {ref:.4g}) folded unbounded: more replies exceeded it than robust.held_back_mb "
                    f"({_n_replies(self.capacity)}) holds back"
                )
            light = sum(1 for n in self.folded_norms if n * self.factor < ref) if self.weigh else 0
            if light:
                self.rl.flagged.append(
                    f"{_n_replies(light)} below 1/{self.factor:g} of the round's median {self._what()} folded at "
                    f"their declared weight (robust.weight_from_norm): the round's replies exceed "
                    f"robust.held_back_mb ({_n_replies(self.capacity)})"
                )
            held = [(n, x) for n, u in held if (x := self._bounded(u, n)) is not None]
        kept = [u for _, u in held]
        return self._same_direction(kept) if self.min_cosine > -1.0 else kept

    def _start(self, update: Update) -> LoraFactors:
        return self.strategy.round_start(update.profile, self.server_round)

    def _size(self, update: Update) -> float:
        """n^p: what a reply's norm is divided by before it is compared (1 when p is 0)."""
        return max(update.weight, 1.0) ** self.power

    def _norm_limit(self, update: Update) -> float:
        """The norm bound's limit on ``update``'s norm at its weight: robust.relative_norm_bound x the
        round's median normalised norm x n^p."""
        return self.factor * (self.reference or 0.0) * self._size(update)

    def _what(self) -> str:
        return f"update norm / examples^{self.power:g}" if self.power else "update norm"

    def _bounded(self, update: Update, norm: float) -> Update | None:
        """``update`` with the norm bound and the weight from its norm applied (named where they cut),
        or None when it is rejected; ``norm`` is its normalised norm."""
        ref = self.reference
        if ref is None or ref <= 0:
            return update
        who = f"client {update.profile.client_id}"
        ratio = norm / ref
        if self.weigh and ratio * self.factor < 1.0:
            supported = update.weight * (ratio * self.factor) ** (1.0 / self.power)
            self.rl.clipped.append(
                f"{who}: weight {update.weight:g} examples cut to {supported:.4g}: its {self._what()} is {ratio:.3g}x "
                f"the round's median {ref:.4g}, below 1/robust.relative_norm_bound ({1 / self.factor:.3g}x), so its "
                "update supports no more (robust.weight_from_norm)"
            )
            update.weight = supported
        if ratio <= self.factor:
            return update
        size = self._size(update)
        limit = self._norm_limit(update)
        over = f" over {update.weight:g} examples" if self.power else ""
        why = (
            f"update norm {norm * size:.4g}{over} is {ratio:.3g}x the round's median {self._what()} {ref:.4g}, "
            f"above robust.relative_norm_bound ({self.factor:g}x)"
        )
        if self.strategy.cfg.robust.norm_action == "reject":
            self.rl.reject(f"{who} (node {update.profile.node_id}): {why}")
            return None
        if self.reject_factor and ratio > self.reject_factor:
            self.rl.reject(
                f"{who} (node {update.profile.node_id}): {why} and robust.relative_norm_reject "
                f"({self.reject_factor:g}x): left out of the fold"
            )
            return None
        update.factors, _ = clip_update(self._start(update), update.factors, limit)
        self.rl.clipped.append(f"{who}: {why}; clipped to {limit:.4g}")
        return update

    def _same_direction(self, held: list[Update]) -> list[Update]:
        if self.folded_norms:
            self.rl.flagged.append(
                f"direction not checked (robust.min_cosine): the round's {_n_replies(len(self.norms))} "
                f"exceed robust.held_back_mb ({_n_replies(self.capacity)})"
            )
            return held
        if len(held) < DIRECTION_QUORUM:
            return held
        ordered = sorted(held, key=lambda u: u.profile.node_id)  # one order, whatever the arrival order
        changes = [update_change(self._start(u), u.factors) for u in ordered]
        if len({c.numel() for c in changes}) > 1:
            self.rl.flagged.append(
                "direction not checked (robust.min_cosine): the round's replies are of different ranks"
            )
            return held
        gram = gram_matrix(changes)
        spread = self.strategy.cfg.robust.cosine_spread
        weights = [u.weight for u in ordered]
        held_to = {i: PROBATION_COSINE for i, u in enumerate(ordered) if u.profile.client_id in self.probation}
        opposed = drop_opposed(
            gram, direction_weights(weights, gram), self.min_cosine, spread, DIRECTION_QUORUM, held_to
        )
        # Every reply's cosine before any cut, and the floor they set: the round's row.
        self.rl.figures["direction-cosines"] = {ordered[i].profile.client_id: c for i, c in opposed.cosines.items()}
        self.rl.figures["direction-floor"] = opposed.floor
        cut = {id(ordered[i]) for i, _, _ in opposed.dropped}
        for i, cos, floor in opposed.dropped:
            u = ordered[i]
            self.cut_by_direction.append(u.profile.client_id)
            if i in held_to and floor == PROBATION_COSINE:
                where = (
                    f"below {PROBATION_COSINE:g}, its floor since the direction bound cut its update in round "
                    f"{self.probation[u.profile.client_id]} (robust.direction_probation)"
                )
            elif floor == self.min_cosine:
                where = f"below robust.min_cosine ({self.min_cosine:g})"
            else:
                where = (
                    f"below {floor:.3g}, the round's median cosine less robust.cosine_spread ({spread:g}) deviations"
                )
            self.rl.reject(
                f"client {u.profile.client_id} (node {u.profile.node_id}): update direction has cosine {cos:.3g} with "
                f"the sum of the round's other kept update directions, {where}; left out of the fold"
            )
        # A kept reply below robust.min_cosine weighs at most the median's weight, by the spread's ramp if it kept it.
        med = median_of(weights)
        for i, cos in opposed.last.items():
            if cos >= self.min_cosine:
                continue
            self.cut_by_direction.append(ordered[i].profile.client_id)
            if cos >= opposed.last_floor:
                share = spread_share(cos, opposed.last_floor, self.min_cosine)
                why = (
                    f"is kept only by robust.cosine_spread (the round's floor {opposed.last_floor:.3g}), at "
                    f"{share:.2g} of the median's say, its place between the floor and robust.min_cosine"
                )
            else:
                share, why = 1.0, f"is kept: {DIRECTION_QUORUM} must remain; at the median's say"
            if ordered[i].weight > share * med:
                self._hold(ordered[i], cos, share * med, why)
        return [u for u in held if id(u) not in cut]

    def _hold(self, update: Update, cos: float, weight: float, why: str) -> None:
        """``update``'s weight cut to ``weight`` and (with the norm bound) its update clipped to the bound
        for that weight; named with its cosine and ``why`` it was kept at that weight."""
        line = (
            f"client {update.profile.client_id}: weight {update.weight:g} examples cut to {weight:.4g}: its update "
            f"direction has cosine {cos:.3g} with the sum of the other kept update directions, below "
            f"robust.min_cosine ({self.min_cosine:g}), and {why}"
        )
        update.weight = weight
        if self.factor > 0 and self.reference:
            limit = self._norm_limit(update)
            update.factors, norm = clip_update(self._start(update), update.factors, limit)
            if norm > limit:
                line += f"; its update norm {norm:.4g} clipped to {limit:.4g}, the norm bound at that weight"
        self.rl.clipped.append(line)


@register_extension
class RobustBounds(Extension):
    """The robust layer (``[robust]``): per reply, the absolute norm bound and the weight cap
    (:func:`bound_update`, :class:`WeightCap`); across a round's replies, the norm and direction
    bounds from the round's own medians (:class:`MedianBounds`); the coordinate median or trimmed
    mean in place of the weighted mean (``robust.aggregation``, as Flower's FedMedian and
    FedTrimmedAvg: every update held, weights ignored); the share cap around the strategy's fold
    (:class:`~fedlora.aggregation.share_cap.ShareCapped`)."""

    name = "robust"
    order = 5  # the first stage a reply meets

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self._stage: MedianBounds | None = None
        self._weight_cap = WeightCap()
        self._below: dict[str, int] = {}  # client id -> the last round its update direction fell below min_cosine

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return True  # its defaults are on; each bound at 0 (or 1.0 for the share cap) is off

    def attach(self, run: GlobalAdapter) -> None:
        """The coordinate median and trimmed mean hold every reply of a round: say how much, and
        refuse a run over ``robust.held_updates_budget_mb`` before it starts."""
        r, f = self.cfg.robust, self.cfg.federation
        if r.aggregation == "mean":
            return
        cohort = min(f.num_clients, max(int(f.num_clients * f.fraction_train), f.min_train_clients))
        need_mb = cohort * run.template.select(run.sharing_policy.shared).numel() * 4 / 2**20
        log.info(
            "robust.aggregation = %s holds every reply of a round: %d clients x %.1f MiB = %.0f MiB",
            r.aggregation,
            cohort,
            need_mb / max(cohort, 1),
            need_mb,
        )
        if need_mb > r.held_updates_budget_mb:
            raise ConfigError(
                f"invalid config for 'robust.aggregation': {r.aggregation} holds every reply of a round, "
                f"{cohort} clients x {need_mb / cohort:.1f} MiB = {need_mb:.0f} MiB, above "
                f"robust.held_updates_budget_mb ({r.held_updates_budget_mb:g}); sample fewer clients, raise the "
                "budget, or use 'mean' with robust.update_norm_bound (folded as replies arrive)"
            )

    def bound_reply(
        self,
        run: GlobalAdapter,
        prof: NodeProfile,
        factors: LoraFactors,
        weight: float,
        server_round: int,
        rl: RoundLog,
    ) -> tuple[LoraFactors, float]:
        return bound_update(run, prof, factors, server_round, rl), self._weight_cap(run, prof, weight, rl)

    def aggregation(self) -> Fold | None:
        r = self.cfg.robust
        if r.aggregation == "median":
            return KeepAll(coordinate_median)
        if r.aggregation == "trimmed-mean":
            return KeepAll(lambda updates: trimmed_mean(updates, r.trim_fraction))
        return None

    def _on_probation(self, server_round: int) -> dict[str, int]:  # client id -> the last round it was cut
        return {c: r for c, r in self._below.items() if 0 < server_round - r <= self.cfg.robust.direction_probation}

    def reply_stage(self, run: GlobalAdapter, rl: RoundLog) -> ReplyStage | None:
        self._stage = MedianBounds(run, rl, self._on_probation(rl.server_round))
        return self

    def offer(self, update: Update) -> list[Update]:
        return self._stage.offer(update)

    def flush(self) -> list[Update]:
        return self._stage.flush()

    def end(self) -> None:
        if (stage := self._stage) is not None:  # the history keeps what the next round's probation can reach
            now = stage.server_round
            self._below = self._on_probation(now + 1) | dict.fromkeys(stage.cut_by_direction, now)

    def server_state(self) -> dict:
        return {"direction-below-min-cosine": dict(self._below)}

    def load_server_state(self, state: dict) -> None:
        self._below = {str(c): int(r) for c, r in state.get("direction-below-min-cosine", {}).items()}

    def wrap_fold(self, fold: Fold, rl: RoundLog) -> Fold:
        cap = self.cfg.robust.max_client_share
        return ShareCapped(fold, cap) if cap < 1.0 and not isinstance(fold, KeepAll) else fold

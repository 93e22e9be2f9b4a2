"""The round check (``robust.round_check``): a round's aggregate becomes the global adapter only if
the clients that trained in it do not score it worse than what they started from.

Per-update rules see only updates, and an update sign-flipped at an honest size looks honest
(docs/hostile-clients.md). The round check sees the outcome instead: each trainer reports its loss on
its own check examples twice, on the adapter it received (in its train reply, before training) and
on the round's aggregate (in the round's evaluate exchange, which Flower's loop runs after the train
round and before the server's evaluation and checkpoint). The round is rolled back when the median
over clients of the relative change, (after - before) / before, is above
``robust.round_check_tolerance``. Each client is paired with itself, so the clients' different data
do not enter the comparison; fewer than half the checking clients, however they report, cannot move
the median outside the range of the honest clients' changes.

When the aggregate fails and the round's accepted updates were all held (they fit
``robust.held_back_mb``, at least 3 of them), the same clients score, in one more message, the round's
leave-one-out aggregates (each update left out in turn, through the round's own fold): the best one
whose median change is within the tolerance is committed and the client it left out is named
(``flagged``). Only when none is within it is the round rolled back. So one liar whose update makes the
round worse costs the round its own update, not the whole round.

What it does not do: it sees what the median trainer sees on its own data, so a round that trades away
what only a minority of clients hold (a label few of them have) can pass; it leaves out at most one
client per round (colluders that each make the round worse roll it back); and what a client keeps
locally (FedSA-LoRA's B, a continual method's state) is not rolled back. Off under differential
privacy: the decision reads the clients' data outside the accounted mechanism.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from fedlora.extensions import Extension, GlobalAdapter
from fedlora.protocol import CHECK_EXAMPLES, CHECK_LOSS, CHECK_LOSS_START
from fedlora.registry import register_extension
from fedlora.robust import median_of

if TYPE_CHECKING:
    from fedlora.aggregation.update import Update
    from fedlora.config import FedLoraConfig
    from fedlora.factors import LoraFactors
    from fedlora.strategies.round_log import RoundLog

log = logging.getLogger("fedlora.server")


def relative_change(before: float, after: float) -> float:
    """(after - before) / before for non-negative losses; a zero loss that stays zero is no change,
    and one that rises is an infinite rise."""
    if before > 0:
        return (after - before) / before
    return 0.0 if after <= 0 else float("inf")


def median_change(pairs: Sequence[tuple[float, float]]) -> float:
    """The median over clients of each one's :func:`relative_change` (before, after)."""
    return median_of([relative_change(b, a) for b, a in pairs])


class CheckedRun(GlobalAdapter, Protocol):
    """What the round check needs of the strategy besides its global adapter."""

    def who(self, node: int) -> str: ...

    def fold_round(
        self, server_round: int, rl: RoundLog, updates: list[Update], previous: LoraFactors
    ) -> LoraFactors: ...

    def score_candidates(
        self, rl: RoundLog, nodes: list[int], candidates: list[LoraFactors], config: dict
    ) -> dict[int, list[float]]: ...


@register_extension
class RoundCheck(Extension):
    """``robust.round_check``: the trainers score the round's aggregate against their start; a round
    they score worse is committed without the one update whose absence they score best, or rolled
    back (the module's docstring)."""

    name = "round-check"
    order = 95  # after every other extension's stage and after_fold: it checks what they leave

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self._round = 0
        self._before: dict[int, float] = {}  # node -> check loss on the adapter it started the round from
        self._after: dict[int, float] = {}  # node -> check loss on the round's aggregate
        self._previous: LoraFactors | None = None  # the global adapter before this round's fold
        self._held: dict[int, Update] | None = {}  # node -> its bounded update; None: over the budget
        self._held_bytes = 0

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return bool(cfg.robust.round_check) and not (cfg.privacy.client_dp or cfg.privacy.example_dp)

    def _examples(self) -> int:
        return int(self.cfg.robust.round_check_examples)

    def begin_round(self, run: GlobalAdapter, rl: RoundLog) -> None:
        self._round, self._before, self._after, self._previous = rl.server_round, {}, {}, None
        self._held, self._held_bytes = {}, 0

    def round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        return {CHECK_EXAMPLES: self._examples()}

    # The last stage before the fold: every update passes on at once; a reference is kept, while the
    # round's updates fit robust.held_back_mb, for the leave-one-out candidates.
    def reply_stage(self, run: GlobalAdapter, rl: RoundLog) -> RoundCheck:
        return self

    def offer(self, update: Update) -> list[Update]:
        if self._held is not None:
            self._held_bytes += update.factors.numel() * 4
            if self._held_bytes > self.cfg.robust.held_back_mb * 2**20:
                self._held = None
            else:
                self._held[update.profile.node_id] = update
        return [update]

    def flush(self) -> list[Update]:
        return []

    def end(self) -> None:
        pass

    def reply_accepted(self, node_id: int, metrics: dict) -> None:
        # Both values were checked finite and non-negative with the reply (fedlora.validation).
        if CHECK_LOSS_START in metrics:
            self._before[node_id] = float(metrics[CHECK_LOSS_START])
        if CHECK_LOSS in metrics:
            self._after[node_id] = float(metrics[CHECK_LOSS])

    def after_fold(self, run: GlobalAdapter, rl: RoundLog, previous: LoraFactors) -> LoraFactors:
        self._previous = previous
        return run.global_eff

    def check_request(self, rl: RoundLog) -> dict[int, dict[str, int | float | str | bool]]:
        if self._previous is None or rl.server_round != self._round or rl.aggregation_error:
            return {}  # no new aggregate this round
        return {node: {CHECK_EXAMPLES: self._examples()} for node in sorted(self._before)}

    def after_evaluate(self, run: CheckedRun, rl: RoundLog) -> None:  # type: ignore[override]
        if self._previous is None or rl.server_round != self._round:
            return
        previous, self._previous = self._previous, None
        pairs = [(b, self._after[n]) for n, b in sorted(self._before.items()) if n in self._after]
        tol = self.cfg.robust.round_check_tolerance
        rl.figures["round-check-clients"] = len(pairs)
        if not pairs:
            rl.figures["round-check"] = "unchecked: no trainer scored the aggregate; the round is kept"
            log.warning("round %d: %s", rl.server_round, rl.figures["round-check"])
            return
        change = median_change(pairs)
        rl.figures["round-check-median-change"] = change
        if change <= tol:
            return
        worse = (
            f"the median client's check loss rose by {change:.2%} on the round's aggregate ({len(pairs)} "
            f"clients scored it), above robust.round_check_tolerance ({tol:.2%})"
        )
        best = self._leave_one_out(run, rl, previous)
        if best is not None and best[2] <= tol:
            node, candidate, loo_change = best
            run.global_eff = candidate
            rl.figures["round-check-left-out"] = run.who(node)
            rl.flagged.append(
                f"{run.who(node)}: left out of the round by the round check: {worse}; without this client's "
                f"update it changes by {loo_change:+.2%}, the best of the round's leave-one-out aggregates"
            )
            return
        run.global_eff = previous
        tried = "" if best is None else f"; the best leave-one-out aggregate changes it by {best[2]:+.2%}"
        rl.figures["rolled-back"] = f"{worse}{tried}: the round is rolled back and the global adapter stays as it was"
        log.warning("round %d: %s", rl.server_round, rl.figures["rolled-back"])

    def _leave_one_out(
        self, run: CheckedRun, rl: RoundLog, previous: LoraFactors
    ) -> tuple[int, LoraFactors, float] | None:
        """(the node left out, the aggregate without it, its median change) of the leave-one-out
        aggregate the trainers score best, or None when the round's updates were not all held."""
        held = self._held
        folded = sorted(n for n in self._before)  # the trainers whose update the fold took
        if held is None or len(folded) < 3 or any(n not in held for n in folded):
            return None
        candidates = [
            run.fold_round(rl.server_round, rl, [held[m] for m in folded if m != n], previous) for n in folded
        ]
        scores = run.score_candidates(rl, folded, candidates, {CHECK_EXAMPLES: self._examples()})
        results = []
        for k, node in enumerate(folded):
            pairs = [(self._before[m], scores[m][k]) for m in folded if m in scores]
            if pairs:
                results.append((median_change(pairs), k, node))
        if not results:
            return None
        rl.figures["round-check-without"] = {run.who(node): change for change, _, node in results}
        change, k, node = min(results)
        return node, candidates[k], change

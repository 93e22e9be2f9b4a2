"""The round check (``robust.round_check``, opt-in): a round's aggregate becomes the global adapter only
if the clients that trained in it do not score it worse than what they started from.

Per-update rules see only updates, and an update sign-flipped at an honest size looks honest
(docs/hostile-clients.md). The round check sees the outcome instead: each trainer reports its loss on
its own check examples twice, on the adapter it received (in its train reply, before training) and
on the round's aggregate (in the round's evaluate exchange, which Flower's loop runs after the train
round and before the server's evaluation and checkpoint). The round is rolled back when the median
over trainers of the relative change, (after - before) / before, is above
``robust.round_check_tolerance``. Each client is paired with itself, so the clients' different data
do not enter the comparison; fewer than half the checking clients, however they report, cannot move
the median outside the range of the honest clients' changes.

What it does not do: it sees what the median trainer sees on its own data, so on non-IID data a round
that trades away what only a minority of clients hold (a label few of them have) can pass; it names
no client (a rollback is the round's, not a reply's); a rolled-back round's honest work is lost with
it, so clients that make every round worse stall the run (visibly: every round line says "rolled
back"); and what a client keeps locally (FedSA-LoRA's B, a continual method's state) is not rolled
back. Off under differential privacy: the decision reads the clients' data outside the accounted
mechanism.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedlora.extensions import Extension, GlobalAdapter
from fedlora.protocol import CHECK_EXAMPLES, CHECK_LOSS, CHECK_LOSS_START
from fedlora.registry import register_extension
from fedlora.robust import median_of

if TYPE_CHECKING:
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


@register_extension
class RoundCheck(Extension):
    """``robust.round_check``: the trainers score the round's aggregate against their start; the round
    is rolled back when the median trainer's relative change is above ``robust.round_check_tolerance``."""

    name = "round-check"
    order = 95  # after every other extension's after_fold: it checks the aggregate they leave

    def __init__(self, cfg: FedLoraConfig) -> None:
        super().__init__(cfg)
        self._round = 0
        self._before: dict[int, float] = {}  # node -> check loss on the adapter it started the round from
        self._after: dict[int, float] = {}  # node -> check loss on the round's aggregate
        self._previous: LoraFactors | None = None  # the global adapter before this round's fold

    @classmethod
    def applies(cls, cfg: FedLoraConfig) -> bool:
        return bool(cfg.robust.round_check) and not (cfg.privacy.client_dp or cfg.privacy.example_dp)

    def _examples(self) -> int:
        return int(self.cfg.robust.round_check_examples)

    def begin_round(self, run: GlobalAdapter, rl: RoundLog) -> None:
        self._round, self._before, self._after, self._previous = rl.server_round, {}, {}, None

    def round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        return {CHECK_EXAMPLES: self._examples()}

    def reply_accepted(self, node_id: int, metrics: dict) -> None:
        # Both values were checked finite and non-negative with the reply (fedlora.validation); a train
        # reply reaches this hook only once its update is folded.
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

    def after_evaluate(self, run: GlobalAdapter, rl: RoundLog) -> None:
        if self._previous is None or rl.server_round != self._round or rl.aggregation_error:
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
        if change > tol:
            run.global_eff = previous
            rl.figures["rolled-back"] = (
                f"the median client's check loss rose by {change:.2%} on the round's aggregate "
                f"({len(pairs)} clients scored it), above robust.round_check_tolerance ({tol:.2%}): "
                "the round is rolled back and the global adapter stays as it was"
            )
            log.warning("round %d: %s", rl.server_round, rl.figures["rolled-back"])

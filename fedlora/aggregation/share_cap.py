"""The share cap as a stage of the fold: ``robust.max_client_share``, exact and streamed."""

from __future__ import annotations

import heapq
import math

from fedlora.aggregation.folds import Fold, _check_weight
from fedlora.factors import LoraFactors
from fedlora.robust import cap_shares


class ShareCapped(Fold):
    """``robust.max_client_share`` around a fold that normalises its weights (every fold here but
    :class:`KeepAll`): no client's normalised weight exceeds the cap, exactly as
    :func:`fedlora.robust.cap_shares` (water-filling) gives for the whole round, yet folded.

    Why this can stream: water-filling caps the heaviest clients, and fewer than 1/cap of them
    (each capped client holds exactly the cap). So the ``ceil(1/cap)`` heaviest updates seen so
    far are held back; every other one can only end uncapped, with a share proportional to its
    weight, and is folded at once with its raw weight. At ``finish`` the held updates are folded
    with their water-filled share rescaled to the same proportion. Holds ceil(1/cap) updates."""

    def __init__(self, inner: Fold, max_share: float) -> None:
        self.inner, self.max_share = inner, max_share
        self.held_max = math.ceil(1.0 / max_share - 1e-9) if max_share < 1.0 else 0
        self._held: list[tuple[float, int, LoraFactors]] = []  # a min-heap on (weight, arrival)
        self.weights: list[float] = []
        self._folded: int | None = None  # the arrival index of one update folded with its raw weight
        self.count = 0

    def __getattr__(self, name: str):
        # What the wrapped fold reports (HetLoRA's covered rank, the sketch's size and error) reads
        # through the cap: callers need not know whether a round is capped.
        if name == "inner":  # not set yet (during construction): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def check(self, update_eff: LoraFactors) -> None:
        self.inner.check(update_eff)

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        w = _check_weight(weight)
        self.inner.check(update_eff)  # a held update must fit when it is folded at the end
        if not self.held_max:
            self.inner.add(update_eff, w)
        else:
            item = (w, len(self.weights), update_eff)
            if len(self._held) < self.held_max:
                heapq.heappush(self._held, item)
            elif (w, item[1]) > self._held[0][:2]:
                light = self._held[0]
                self.inner.add(light[2], light[0])
                heapq.heapreplace(self._held, item)
                self._folded = light[1]
            else:
                self.inner.add(update_eff, w)
                self._folded = item[1]
        self.weights.append(w)
        self.count += 1

    def finish(self) -> LoraFactors:
        self._fold_held()
        return self.inner.finish()

    def result(self, rank: int | None) -> LoraFactors:
        """For a :class:`ProductSum` inside: its product sum at ``rank``."""
        self._fold_held()
        return self.inner.result(rank)

    def _fold_held(self) -> None:
        if not self._held:
            return
        shares = cap_shares(self.weights, self.max_share)
        # Uncapped updates have share c * weight; the inner fold holds them at their raw weight.
        c = 1.0 if self._folded is None else shares[self._folded] / self.weights[self._folded]
        for _, i, u in sorted(self._held, key=lambda h: h[1]):
            self.inner.add(u, shares[i] / c)
        self._held = []

    def held_bytes(self) -> int:
        return self.inner.held_bytes() + sum(
            t.numel() * t.element_size() for _, _, u in self._held for _, t in u.tensors()
        )

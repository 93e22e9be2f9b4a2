"""Aggregation as a fold: updates are added one at a time and the aggregate is read at the end.

Each accumulator here takes a client's update (effective form, see :mod:`fedlora.lora_math`) and
its aggregation weight, folds it into a running state at once, and lets the caller drop it. The
state's size does not depend on how many updates were added (except :class:`KeepAll`, which the
coordinate median and trimmed mean need), so a round's memory is a few adapters whatever the
cohort. Every ``add`` checks its input completely before it touches the state: an update that
does not fit leaves no trace.

Running sums are kept in float64: the result no longer depends on the order replies arrive in
(beyond float64 rounding, far below the float32 the adapters are stored in), which is what lets
the server fold replies as they come instead of sorting a list first.

These are the same maths as the batch functions of :mod:`fedlora.lora_math` (which the tests use
as oracles): :class:`WeightedMean` is ``weighted_mean``, :class:`ZeroPaddedMean` is
``aggregate_zero_padded``, :class:`ExactProductSum` is ``aggregate_stacked`` (and, at a rank,
``aggregate_svd``). :class:`SketchedProductSum` replaces the stack for large cohorts by a
single-pass randomized sketch of the weighted sum of products.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import _fit_cols, _fit_rows, _product_norm, normalise


class Fold:
    """The protocol: ``add(update_eff, weight)`` any number of times, then ``finish()`` once."""

    count: int = 0

    _sig: _Signature | None = None  # what every update of this fold must share (set by each fold)

    def check(self, update_eff: LoraFactors) -> None:
        """Raise :class:`ValueError` if ``update_eff`` cannot be folded with what came before (the
        first update checked sets the reference). ``add`` calls it before touching any state."""
        if self._sig is not None:
            self._sig.check(update_eff)

    def _accept(self, update_eff: LoraFactors, weight: float) -> float:
        """The checks every ``add`` starts with: the weight, then the update's fit. Returns the weight."""
        w = _check_weight(weight)
        self.check(update_eff)
        return w

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        raise NotImplementedError

    def finish(self) -> LoraFactors:
        raise NotImplementedError

    def held_bytes(self) -> int:
        """Bytes of tensors the running state holds now (the server-scale benchmark and the table in docs/architecture.md)."""
        return 0


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not (math.isfinite(w) and w >= 0):
        raise ValueError(f"aggregation weight must be finite and >= 0, got {weight!r}")
    return w


class _Signature:
    """What every update of a fold must share: its tensor keys and shapes (``ranks=False``), or its
    modules, with A and B present and their ranks at most ``max_rank`` (``ranks=True``), and its heads."""

    def __init__(self, ranks: bool, max_rank: int | None = None) -> None:
        self.ranks, self.max_rank = ranks, max_rank
        self.ref = None

    def check(self, u: LoraFactors) -> None:
        if self.ranks:
            for name, m in u.modules.items():
                if m.A is None or m.B is None:
                    raise ValueError(f"{name}: a heterogeneous-rank fold needs both A and B")
                if self.max_rank is not None and m.rank > self.max_rank:
                    raise ValueError(f"{name}: rank {m.rank} is above the fold's {self.max_rank}")
            sig = (sorted(u.modules), sorted((k, tuple(t.shape)) for k, t in u.extras.items()))
        else:
            sig = [(k, tuple(t.shape)) for k, t in u.tensors()]
        if self.ref is None:
            self.ref = sig
        elif sig != self.ref:
            raise ValueError(
                "the update carries different tensors or shapes than the updates folded before it; "
                "mixed ranks need a heterogeneous-rank strategy"
            )


class _TensorSums:
    """Per-key float64 running sums of same-shaped tensors (the first update fixes keys and shapes)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, items: list[tuple[str, torch.Tensor]], weight: float) -> None:
        if not self.sums:
            self.sums = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in items}
        for k, t in items:
            self.sums[k].add_(t.double(), alpha=weight)

    def mean(self, total: float) -> dict[str, torch.Tensor]:
        return {k: (s / total).to(torch.float32) for k, s in self.sums.items()}

    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.sums.values())


class WeightedMean(Fold):
    """``sum_k w_k x_k / sum_k w_k`` of every tensor (same keys and shapes in every update): FedIT,
    FFA-LoRA and FedSA-LoRA's average, and client-level DP's sum. Holds one adapter (float64)."""

    def __init__(self) -> None:
        self._sums = _TensorSums()
        self._sig = _Signature(ranks=False)
        self.alpha: dict[str, float] = {}
        self.total = 0.0
        self.count = 0

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        w = self._accept(update_eff, weight)
        items = list(update_eff.tensors())
        if not self.count:
            self.alpha = {n: m.alpha for n, m in update_eff.modules.items()}
        self._sums.add(items, w)
        self.total += w
        self.count += 1

    def finish(self) -> LoraFactors:
        if not self.count or self.total <= 0:
            raise ValueError(
                f"aggregation weights must have a positive sum; {self.count} update(s) folded, "
                f"total weight {self.total}"
            )
        return LoraFactors.from_tensors(self._sums.mean(self.total), self.alpha)

    def held_bytes(self) -> int:
        return self._sums.nbytes()


class _HeadMean:
    """The weighted mean of the heads (extras), beside a fold of the modules."""

    def __init__(self) -> None:
        self._sums = _TensorSums()

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        items = sorted(update_eff.extras.items())
        if items:
            self._sums.add(items, weight)

    def mean(self, total: float) -> dict[str, torch.Tensor]:
        return self._sums.mean(total) if self._sums.sums else {}


class ZeroPaddedMean(Fold):
    """HetLoRA (Cho et al., 2024): each update's A rows and B columns zero-padded to ``max_rank``;
    with ``sparsity_weighted`` a module's weights are ``w_k * ||B_k A_k||_F`` normalised over the
    clients (when every product is zero, the plain weights). Heads: the plain weighted mean.
    ``finish`` returns rank ``max(min_rank, largest rank folded)``; :attr:`covered` is that largest
    rank. Holds four padded adapters (float64): the norm-weighted and the plain sums."""

    def __init__(self, max_rank: int, sparsity_weighted: bool = True, min_rank: int = 1) -> None:
        self.max_rank, self.sparsity_weighted, self.min_rank = max_rank, sparsity_weighted, min_rank
        self._norm_sums: dict[str, list] = {}  # module -> [sum w n A, sum w n B, sum w n]
        self._plain_sums: dict[str, list] = {}  # module -> [sum w A, sum w B]
        self._heads = _HeadMean()
        self._sig = _Signature(ranks=True, max_rank=max_rank)
        self.total = 0.0
        self.count = 0
        self.covered = 0

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        w = self._accept(update_eff, weight)
        parts = {}
        for name, m in update_eff.modules.items():
            A, B = _fit_rows(m.A, self.max_rank).double(), _fit_cols(m.B, self.max_rank).double()
            parts[name] = (A, B, float(_product_norm(m.B.double(), m.A.double())) if self.sparsity_weighted else 1.0)
        for name, (A, B, n) in parts.items():
            if name not in self._plain_sums:
                self._norm_sums[name] = [torch.zeros_like(A), torch.zeros_like(B), 0.0]
                self._plain_sums[name] = [torch.zeros_like(A), torch.zeros_like(B)]
            ns, ps = self._norm_sums[name], self._plain_sums[name]
            ns[0].add_(A, alpha=w * n)
            ns[1].add_(B, alpha=w * n)
            ns[2] += w * n
            ps[0].add_(A, alpha=w)
            ps[1].add_(B, alpha=w)
        self._heads.add(update_eff, w)
        self.total += w
        self.count += 1
        self.covered = max(self.covered, max((m.rank for m in update_eff.modules.values()), default=0))

    def finish(self) -> LoraFactors:
        if not self.count or self.total <= 0:
            raise ValueError(f"aggregation weights must have a positive sum; {self.count} update(s) folded")
        rank = max(self.min_rank, self.covered)
        out = LoraFactors(extras=self._heads.mean(self.total))
        for name, (sA, sB, sn) in self._norm_sums.items():
            if sn > 0:
                A, B = sA / sn, sB / sn
            else:
                pA, pB = self._plain_sums[name]
                A, B = pA / self.total, pB / self.total
            out.modules[name] = ModuleFactors(
                A=A[:rank].to(torch.float32), B=B[:, :rank].to(torch.float32), alpha=float(rank)
            )
        return out

    def held_bytes(self) -> int:
        return (
            sum(
                t.numel() * t.element_size()
                for s in (*self._norm_sums.values(), *self._plain_sums.values())
                for t in s
                if isinstance(t, torch.Tensor)
            )
            + self._heads._sums.nbytes()
        )


class KeepAll(Fold):
    """Holds every update for a statistic that needs them all at once (coordinate median, trimmed
    mean): ``finish`` applies ``statistic`` to the list. Memory grows with the cohort; the server
    states it and refuses it above ``robust.held_updates_budget_mb`` before the run starts."""

    def __init__(self, statistic: Callable[[list[LoraFactors]], LoraFactors]) -> None:
        self.statistic = statistic
        self.updates: list[LoraFactors] = []
        self._sig = _Signature(ranks=False)
        self.count = 0

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        self._accept(update_eff, weight)
        self.updates.append(update_eff)
        self.count += 1

    def finish(self) -> LoraFactors:
        return self.statistic(self.updates)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for u in self.updates for _, t in u.tensors())


def batch(fold: Fold, updates_eff: list[LoraFactors], weights: list[float]) -> Fold:
    """Fold a list (tests, benchmarks): the same path the server takes one reply at a time."""
    normalise(weights)  # the batch functions' own check: non-negative with a positive sum
    for u, w in zip(updates_eff, weights):
        fold.add(u, w)
    return fold


__all__ = ["Fold", "KeepAll", "WeightedMean", "ZeroPaddedMean", "batch"]

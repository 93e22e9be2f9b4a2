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
import zlib
from collections.abc import Callable

import torch

from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import _fit_cols, _fit_rows, _product_norm, aggregate_stacked, normalise, svd_redistribute


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
            raise ValueError("the update carries different tensors or shapes than the updates folded before it; "
                             "mixed ranks need a heterogeneous-rank strategy")


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
            raise ValueError(f"aggregation weights must have a positive sum; {self.count} update(s) folded, "
                             f"total weight {self.total}")
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
            out.modules[name] = ModuleFactors(A=A[:rank].to(torch.float32), B=B[:, :rank].to(torch.float32),
                                              alpha=float(rank))
        return out

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in (*self._norm_sums.values(), *self._plain_sums.values())
                   for t in s if isinstance(t, torch.Tensor)) + self._heads._sums.nbytes()


class ProductSum(Fold):
    """``sum_k p_k B_k A_k`` per module (p: the normalised weights), read at a rank: FLoRA's stack
    and FlexLoRA's SVD redistribution. Heads: the weighted mean."""

    def result(self, rank: int | None) -> LoraFactors:
        raise NotImplementedError

    def finish(self) -> LoraFactors:
        return self.result(None)


class ExactProductSum(ProductSum):
    """Keeps every update: ``result(None)`` is the exact stack (rank sum r_k, FLoRA), ``result(r)``
    its best rank-r factors by QR of the stack and an SVD of its small core (FlexLoRA). For small
    cohorts, and the oracle the sketch is tested against. Holds every update."""

    def __init__(self) -> None:
        self.updates: list[LoraFactors] = []
        self.weights: list[float] = []
        self._sig = _Signature(ranks=True)
        self.count = 0

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        w = self._accept(update_eff, weight)
        self.updates.append(update_eff)
        self.weights.append(w)
        self.count += 1

    def result(self, rank: int | None) -> LoraFactors:
        stacked = aggregate_stacked(self.updates, self.weights)
        return stacked if rank is None else svd_redistribute(stacked, rank)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for u in self.updates for _, t in u.tensors())


class SketchedProductSum(ProductSum):
    """The weighted sum of products through a single-pass randomized sketch, never stacked.

    Per module, with the sum X = sum_k w_k B_k A_k (out x in), it accumulates from each update's
    factors the range sketch Y = X Omega (out x k), the co-range sketch W = Psi X (l x in) and a
    test sketch T = Theta X (q x in), Omega, Psi, Theta Gaussian and drawn once from ``seed``.
    ``result(r)`` reconstructs as Tropp, Yurtsever, Udell and Cevher (SIMAX 2017, "Practical
    sketching algorithms for low-rank matrix approximation", Algorithm 7 with the fixed-rank
    truncation of their section 5): Q = orth(Y), X_hat = Q (Psi Q)^+ W, then the best rank-r
    factors of X_hat, sqrt(S) split between them as FlexLoRA does. X_hat equals X exactly when X's
    rank is at most k (Halko, Martinsson and Tropp 2011). ``k = rank + oversampling``,
    ``l = 2k + 1`` (Tropp et al.'s recommendation). :meth:`relative_error` estimates
    ||X - X_r|| / ||X|| from the test sketch (Tropp et al. 2019, SISC, "Streaming low-rank matrix
    approximation with an application to scientific simulation", section 6), so every round can
    log it without the exact stack. Holds per module (k + l + q) x (out or in) floats."""

    def __init__(self, rank: int, oversampling: int, seed: int = 0, test_size: int = 8) -> None:
        self.rank, self.k = rank, rank + oversampling
        self.l, self.q = 2 * self.k + 1, test_size
        self.seed = seed
        self._maps: dict[tuple, torch.Tensor] = {}
        # Modules of one shape are sketched together, stacked: (out, in) -> (names, [Y, W, T] of G x ... each).
        self._groups: dict[tuple[int, int], tuple[list[str], list[torch.Tensor]]] = {}
        self._heads = _HeadMean()
        self._sig = _Signature(ranks=True)
        self.total = 0.0
        self.count = 0
        self.last_error: float | None = None

    def _gaussian(self, kind: str, shape: tuple[int, int]) -> torch.Tensor:
        key = (kind, shape)
        if key not in self._maps:  # one map per shape: modules of one shape share it (the sketch is linear)
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{kind}/{shape}".encode()))
            self._maps[key] = torch.randn(shape, generator=g)
        return self._maps[key]

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        w = self._accept(update_eff, weight)
        if not self._groups:
            for name in sorted(update_eff.modules):
                m = update_eff.modules[name]
                self._groups.setdefault((m.B.shape[0], m.A.shape[1]), ([], []))[0].append(name)
        for (out_dim, in_dim), (names, sums) in self._groups.items():
            # One batched product per shape group (a 7B adapter: 64 modules, 2 groups): the small
            # r x k, l x r and q x r cores first, never an out x in matrix, then one fused
            # multiply-accumulate into each running sketch (float32: a sketch's own error is far larger
            # than float32's rounding over thousands of terms).
            A = torch.stack([update_eff.modules[n].A for n in names]).float()
            B = torch.stack([update_eff.modules[n].B for n in names]).float()
            omega = self._gaussian("omega", (in_dim, self.k))
            psi = self._gaussian("psi", (self.l, out_dim))
            theta = self._gaussian("theta", (self.q, out_dim))
            if not sums:
                g = len(names)
                sums.extend([torch.zeros(g, out_dim, self.k), torch.zeros(g, self.l, in_dim), torch.zeros(g, self.q, in_dim)])
            sums[0].baddbmm_(B, A @ omega, alpha=w)
            sums[1].baddbmm_(psi @ B, A, alpha=w)
            sums[2].baddbmm_(theta @ B, A, alpha=w)
        self._heads.add(update_eff, w)
        self.total += w
        self.count += 1

    def result(self, rank: int | None) -> LoraFactors:
        if not self.count or self.total <= 0:
            raise ValueError(f"aggregation weights must have a positive sum; {self.count} update(s) folded")
        rank = self.rank if rank is None else rank
        if rank > self.k:
            raise ValueError(f"the sketch (size {self.k}) cannot give rank {rank}")
        out = LoraFactors(extras=self._heads.mean(self.total))
        num = den = 0.0
        per_module = [(n, *(s[i] for s in sums)) for names, sums in self._groups.values() for i, n in enumerate(names)]
        for name, Y, W, T in per_module:
            Y, W, T = (x.double() / self.total for x in (Y, W, T))
            Q, _ = torch.linalg.qr(Y)
            psi = self._gaussian("psi", (self.l, Y.shape[0])).double()
            Z = torch.linalg.lstsq(psi @ Q, W).solution  # k x in: X_hat = Q Z
            U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
            r = min(rank, S.shape[0])
            sq = S[:r].sqrt()
            Bn, An = (Q @ U[:, :r]) * sq, sq.unsqueeze(1) * Vh[:r]
            if r < rank:
                Bn = torch.cat([Bn, Bn.new_zeros(Bn.shape[0], rank - r)], 1)
                An = torch.cat([An, An.new_zeros(rank - r, An.shape[1])], 0)
            theta = self._gaussian("theta", (self.q, Y.shape[0])).double()
            num += float(((T - (theta @ Bn) @ An) ** 2).sum())
            den += float((T ** 2).sum())
            out.modules[name] = ModuleFactors(A=An.to(torch.float32), B=Bn.to(torch.float32), alpha=float(rank))
        self.last_error = math.sqrt(num / den) if den > 0 else 0.0
        return out

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, s in self._groups.values() for t in s) + sum(
            t.numel() * t.element_size() for t in self._maps.values())


class BudgetedProductSum(ProductSum):
    """The exact stack while the updates it holds fit ``budget_bytes``; the first update that would
    not fit moves every held update, and each later one, into the sketch ``make_sketch()`` returns,
    and the held updates are dropped. Memory is then bounded by the budget plus the sketch whatever
    the cohort, and the result is exact whenever the round's updates fit. ``path``: "exact" or
    "sketch", for the round log; ``last_error``: the sketch's own error estimate, if it was used."""

    def __init__(self, budget_bytes: float, make_sketch: Callable[[], SketchedProductSum]) -> None:
        self.budget = budget_bytes
        self.make_sketch = make_sketch
        self.exact: ExactProductSum | None = ExactProductSum()
        self.sketch: SketchedProductSum | None = None

    @property
    def path(self) -> str:
        return "exact" if self.sketch is None else "sketch"

    @property
    def count(self) -> int:
        return self.sketch.count if self.sketch is not None else self.exact.count

    @property
    def last_error(self) -> float | None:
        return self.sketch.last_error if self.sketch is not None else None

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        if self.sketch is None:
            size = sum(t.numel() * t.element_size() for _, t in update_eff.tensors())
            if self.exact.held_bytes() + size <= self.budget:
                self.exact.add(update_eff, weight)
                return
            self.sketch = self.make_sketch()
            held, self.exact = self.exact, None
            for u, w in zip(held.updates, held.weights):
                self.sketch.add(u, w)
            del held
        self.sketch.add(update_eff, weight)

    def result(self, rank: int | None) -> LoraFactors:
        return (self.sketch or self.exact).result(rank)

    def held_bytes(self) -> int:
        return (self.sketch or self.exact).held_bytes()


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


__all__ = ["BudgetedProductSum", "ExactProductSum", "Fold", "KeepAll", "ProductSum", "SketchedProductSum", "WeightedMean", "ZeroPaddedMean",
           "batch"]

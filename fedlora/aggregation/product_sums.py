"""FLoRA's and FlexLoRA's fold: the weighted sum of products ``sum_k p_k B_k A_k`` per module.

Three ways to hold it, all folds (one reply at a time, then dropped):

* :class:`ExactProductSum`, the stack: exact, holds every reply (small cohorts; the tests' oracle);
* :class:`DenseProductSum`, the summed ``out x in`` matrices in float64: exact, and flat in the
  cohort, but ``8 * out * in`` bytes per module (a small model's adapter; not a 7B one);
* :class:`SketchedProductSum`, a single-pass randomized sketch: flat in the cohort and in the
  model's width, exact while the sum's rank is at most the sketch size, approximate beyond it.

:class:`BudgetedProductSum` chooses among them by ``hetero.exact_budget_mb``: the stack while the
held replies fit, then the dense sum when it fits, the sketch only when neither exact form does;
its ``path`` names the form used, for the round log.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch

from fedlora.aggregation.folds import Fold, _HeadMean, _Signature
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import aggregate_stacked, svd_redistribute


class ProductSum(Fold):
    """``sum_k p_k B_k A_k`` per module (p: the normalised weights), read at a rank: FLoRA's stack
    and FlexLoRA's SVD redistribution. Heads: the weighted mean. ``path`` names the form in the
    round log."""

    path = ""

    def result(self, rank: int | None) -> LoraFactors:
        raise NotImplementedError

    def finish(self) -> LoraFactors:
        return self.result(None)


class ExactProductSum(ProductSum):
    """Keeps every update: ``result(None)`` is the exact stack (rank sum r_k, FLoRA), ``result(r)``
    its best rank-r factors by QR of the stack and an SVD of its small core (FlexLoRA). For small
    cohorts, and the oracle the sketch is tested against. Holds every update."""

    path = "exact"

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

    path = "sketch"

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
                sums.extend(
                    [torch.zeros(g, out_dim, self.k), torch.zeros(g, self.l, in_dim), torch.zeros(g, self.q, in_dim)]
                )
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
            Bn, An = _split_at_rank(Q @ U[:, :rank], S, Vh, rank)
            theta = self._gaussian("theta", (self.q, Y.shape[0])).double()
            num += float(((T - (theta @ Bn) @ An) ** 2).sum())
            den += float((T**2).sum())
            out.modules[name] = ModuleFactors(A=An.to(torch.float32), B=Bn.to(torch.float32), alpha=float(rank))
        self.last_error = math.sqrt(num / den) if den > 0 else 0.0
        return out

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, s in self._groups.values() for t in s) + sum(
            t.numel() * t.element_size() for t in self._maps.values()
        )


class DenseProductSum(ProductSum):
    """The weighted sum of products kept as one ``out x in`` float64 matrix per module: exact (the
    SVD of the true sum, read at a rank) and flat in the cohort. ``result(None)`` reads it at
    ``rank`` or at the sum's numerical rank, whichever is smaller (FLoRA: the stack's product
    without its zero components). Holds ``8 * out * in`` bytes per module plus the heads."""

    path = "dense"

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._sums: dict[str, torch.Tensor] = {}
        self._heads = _HeadMean()
        self._sig = _Signature(ranks=True)
        self.total = 0.0
        self.count = 0

    @staticmethod
    def bytes_for(update_eff: LoraFactors) -> int:
        """What the dense sums of updates shaped like ``update_eff`` hold."""
        return sum(8 * m.B.shape[0] * m.A.shape[1] for m in update_eff.modules.values())

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        w = self._accept(update_eff, weight)
        for name, m in update_eff.modules.items():
            if name not in self._sums:
                self._sums[name] = torch.zeros(m.B.shape[0], m.A.shape[1], dtype=torch.float64)
            self._sums[name].addmm_(m.B.double(), m.A.double(), alpha=w)
        self._heads.add(update_eff, w)
        self.total += w
        self.count += 1

    def result(self, rank: int | None) -> LoraFactors:
        if not self.count or self.total <= 0:
            raise ValueError(f"aggregation weights must have a positive sum; {self.count} update(s) folded")
        out = LoraFactors(extras=self._heads.mean(self.total))
        sums = {n: s / self.total for n, s in self._sums.items()}
        svds = {n: torch.linalg.svd(s, full_matrices=False) for n, s in sums.items()}
        if rank is None:
            rank = min(self.rank, max(_numerical_rank(S, sums[n].shape) for n, (_, S, _) in svds.items()))
        for name, (U, S, Vh) in svds.items():
            Bn, An = _split_at_rank(U, S, Vh, rank)
            out.modules[name] = ModuleFactors(A=An.to(torch.float32), B=Bn.to(torch.float32), alpha=float(rank))
        return out

    def held_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._sums.values())


def _split_at_rank(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U sqrt(S), sqrt(S) Vh) of an SVD's first ``rank`` components, as FlexLoRA splits
    them; zero components pad a sum whose rank is below ``rank``."""
    r = min(rank, S.shape[0])
    sq = S[:r].sqrt()
    B, A = U[:, :r] * sq, sq.unsqueeze(1) * Vh[:r]
    if r < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], 0)
    return B, A


def _numerical_rank(S: torch.Tensor, shape: torch.Size) -> int:
    """Singular values above float64 rounding of the largest (numpy's matrix_rank tolerance); at least 1."""
    if not S.numel() or float(S[0]) <= 0:
        return 1
    return max(1, int((S > S[0] * max(shape) * torch.finfo(torch.float64).eps).sum()))


class BudgetedProductSum(ProductSum):
    """The product sum in the most exact form that fits ``budget_bytes``.

    It starts with the stack (``stack=True``, small cohorts) and holds replies while they fit; the
    first reply that would not fit moves every held reply into the dense sum when that fits the
    budget, otherwise into the sketch ``make_sketch()`` returns, and the held replies are dropped.
    With ``stack=False`` (large cohorts) it starts in the dense sum or the sketch. Memory is then
    bounded by the budget plus the sketch whatever the cohort, and the result is exact unless
    neither exact form fits. ``path``: "exact" (stack), "dense" or "sketch", for the round log;
    ``last_error``: the sketch's own error estimate, if it was used."""

    def __init__(
        self, budget_bytes: float, rank: int, make_sketch: Callable[[], SketchedProductSum], stack: bool = True
    ) -> None:
        self.budget, self.rank = budget_bytes, rank
        self.make_sketch = make_sketch
        self.inner: ProductSum | None = ExactProductSum() if stack else None

    @property
    def path(self) -> str:
        return self.inner.path if self.inner is not None else "exact"

    @property
    def count(self) -> int:  # type: ignore[override]
        return self.inner.count if self.inner is not None else 0

    @property
    def k(self) -> int | None:
        """The sketch's size when the round went to the sketch (FLoRA reads it at most there)."""
        return self.inner.k if isinstance(self.inner, SketchedProductSum) else None

    @property
    def last_error(self) -> float | None:
        return self.inner.last_error if isinstance(self.inner, SketchedProductSum) else None

    def _bounded_form(self, update_eff: LoraFactors) -> ProductSum:
        if DenseProductSum.bytes_for(update_eff) <= self.budget:
            return DenseProductSum(self.rank)
        return self.make_sketch()

    def add(self, update_eff: LoraFactors, weight: float) -> None:
        if self.inner is None:
            self.inner = self._bounded_form(update_eff)
        elif isinstance(self.inner, ExactProductSum):
            size = sum(t.numel() * t.element_size() for _, t in update_eff.tensors())
            if self.inner.held_bytes() + size > self.budget:
                self.inner._accept(update_eff, weight)  # a reply that does not fit the round moves nothing
                held, self.inner = self.inner, self._bounded_form(update_eff)
                for u, w in zip(held.updates, held.weights):
                    self.inner.add(u, w)
                del held
        self.inner.add(update_eff, weight)

    def check(self, update_eff: LoraFactors) -> None:
        if self.inner is not None:
            self.inner.check(update_eff)

    def result(self, rank: int | None) -> LoraFactors:
        if self.inner is None:
            raise ValueError("aggregation weights must have a positive sum; 0 update(s) folded")
        return self.inner.result(rank)

    def held_bytes(self) -> int:
        return self.inner.held_bytes() if self.inner is not None else 0


__all__ = ["BudgetedProductSum", "DenseProductSum", "ExactProductSum", "ProductSum", "SketchedProductSum"]

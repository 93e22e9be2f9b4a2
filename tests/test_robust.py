"""Bounded influence: share cap, norm bound and robust averages, against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.robust import cap_shares, clip_update, coordinate_median, trimmed_mean, update_norm

IN, OUT = 6, 5


def _f(seed: int, rank: int = 3, alpha: float = 6.0, scale: float = 1.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        modules={"m": ModuleFactors(A=torch.randn(rank, IN, generator=g) * scale,
                                    B=torch.randn(OUT, rank, generator=g) * scale, alpha=alpha)},
        extras={"head.w": torch.randn(2, IN, generator=g) * scale})


def test_cap_shares_water_fills_exactly():
    assert cap_shares([1, 1, 98], 0.5) == pytest.approx([0.25, 0.25, 0.5])
    assert cap_shares([1, 2, 97], 0.4) == pytest.approx([0.2, 0.4, 0.4])  # the cap cascades to the second
    assert cap_shares([10, 30, 60], 1.0) == pytest.approx([0.1, 0.3, 0.6])
    assert cap_shares([1, 1000], 0.4) == pytest.approx([0.5, 0.5])  # infeasible cap: uniform
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        cap_shares([0, 0], 0.5)


@settings(deadline=None)
@given(st.lists(st.floats(0.01, 1e12), min_size=1, max_size=20), st.floats(0.05, 1.0))
def test_cap_shares_properties(weights, cap):
    p = cap_shares(weights, cap)
    assert math.isclose(sum(p), 1.0, rel_tol=1e-9)
    if cap * len(weights) > 1:
        assert max(p) <= cap + 1e-9
        # order is kept: a client with more examples never gets less weight
        order = np.argsort(weights, kind="stable")
        assert all(p[order[i]] <= p[order[i + 1]] + 1e-12 for i in range(len(p) - 1))


def test_update_norm_is_the_effective_change_and_clip_lands_on_the_bound():
    start, new = _f(0), _f(1)
    s = 6.0 / 3
    want = math.sqrt(float(((new.modules["m"].A - start.modules["m"].A) ** 2).sum()
                         + ((s * new.modules["m"].B - s * start.modules["m"].B) ** 2).sum()
                         + ((new.extras["head.w"] - start.extras["head.w"]) ** 2).sum()))
    assert update_norm(start, new) == pytest.approx(want, rel=1e-6)
    clipped, norm = clip_update(start, new, want / 4)
    assert norm == pytest.approx(want, rel=1e-6)
    assert update_norm(start, clipped) == pytest.approx(want / 4, rel=1e-5)
    # the clipped update points the same way: start + (new - start) / 4, per tensor
    assert torch.allclose(clipped.modules["m"].A, start.modules["m"].A + (new.modules["m"].A - start.modules["m"].A) / 4)
    # ... B in effective form (scaling s on both sides), and the head: the same direction, not its reverse
    assert torch.allclose(s * clipped.modules["m"].B, s * start.modules["m"].B + s * (new.modules["m"].B - start.modules["m"].B) / 4)
    assert torch.allclose(clipped.extras["head.w"], start.extras["head.w"] + (new.extras["head.w"] - start.extras["head.w"]) / 4)
    same, _ = clip_update(start, new, want * 2)
    assert same is new  # under the bound: untouched


def test_clip_measures_a_pruned_client_on_its_kept_components_in_its_own_scale():
    start = _f(0, rank=4, alpha=8.0)
    new = LoraFactors(modules={"m": ModuleFactors(A=start.modules["m"].A[:3].clone(),
                                                  B=start.modules["m"].B[:, :3] * (8.0 / 4) / (8.0 / 3), alpha=8.0)},
                      extras=dict(start.extras))
    assert update_norm(start, new) == pytest.approx(0.0, abs=1e-6)  # same update, new scaling
    # Clipped, it keeps its own rank: start's first 3 components plus a quarter of its change.
    moved = _f(5, rank=3, alpha=8.0)
    n = update_norm(start, moved)
    clipped, _ = clip_update(start, moved, n / 4)
    assert clipped.modules["m"].A.shape == (3, IN) and update_norm(start, clipped) == pytest.approx(n / 4, rel=1e-5)
    assert torch.allclose(clipped.modules["m"].A, start.modules["m"].A[:3] + (moved.modules["m"].A - start.modules["m"].A[:3]) / 4)
    # A client that shares A only (FedSA) is clipped on A and still sends no B.
    a_only = LoraFactors(modules={"m": ModuleFactors(A=moved.modules["m"].A, B=None, alpha=8.0)})
    clipped, _ = clip_update(start, a_only, 1e-3)
    assert clipped.modules["m"].B is None and update_norm(start, clipped) == pytest.approx(1e-3, rel=1e-4)


def test_median_and_trimmed_mean_resist_one_huge_client():
    honest = [_f(i) for i in range(4)]
    evil = _f(9, scale=1e6)
    med = coordinate_median(honest + [evil])
    tm = trimmed_mean(honest + [evil], 0.2)
    stack = torch.stack([h.modules["m"].A for h in honest])
    lo, hi = stack.min(0).values, stack.max(0).values
    for agg in (med, tm):
        A = agg.modules["m"].A
        assert bool(((A >= lo - 1e-6) & (A <= hi + 1e-6)).all())  # inside the honest range, coordinate-wise
    # hand computation for the trimmed mean on 5 values: drop min and max, average the middle three
    vals = torch.stack([u.extras["head.w"] for u in honest + [evil]]).sort(0).values
    assert torch.allclose(tm.extras["head.w"], vals[1:4].mean(0))
    assert torch.allclose(med.extras["head.w"], vals[2])
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_mean(honest, 0.5)


def test_boundaries_of_the_share_cap_and_the_clip():
    assert cap_shares([0, 1, 1], 0.6) == pytest.approx([0.0, 0.5, 0.5])  # a zero weight is allowed
    assert cap_shares([2, 1, 1], 0.5) == pytest.approx([0.5, 0.25, 0.25])  # exactly at the cap: untouched
    with pytest.raises(ValueError, match="non-negative"):
        cap_shares([-1, 2], 0.9)
    with pytest.raises(ValueError, match="non-negative"):
        cap_shares([], 0.9)
    start, new = _f(0), _f(1)
    n = update_norm(start, new)
    same, norm = clip_update(start, new, n)  # exactly on the bound: not scaled
    assert same is new and norm == n
    only_b = LoraFactors(modules={"m": ModuleFactors(A=None, B=new.modules["m"].B, alpha=6.0)})
    clipped, _ = clip_update(start, only_b, 1e-3)
    assert clipped.modules["m"].A is None and update_norm(start, clipped) == pytest.approx(1e-3, rel=1e-4)
    assert update_norm(start, start) == 0.0

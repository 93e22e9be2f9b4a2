"""Aggregation as a fold (fedlora.aggregation.folds): folding updates one at a time equals the batch
functions of fedlora.lora_math (the former aggregation, kept as oracles), in any arrival order; a
rejected update leaves no trace; the share cap streams exactly; the randomized sketch is exact on
low-rank sums. Through the server's real path: a reply rejected mid-round, DP with a fixed seed."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlora.aggregation.folds import KeepAll, WeightedMean, ZeroPaddedMean, batch
from fedlora.aggregation.product_sums import BudgetedProductSum, DenseProductSum, ExactProductSum, SketchedProductSum
from fedlora.aggregation.share_cap import ShareCapped
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import aggregate_stacked, aggregate_svd, aggregate_zero_padded, weighted_mean
from fedlora.robust import cap_shares, coordinate_median, trimmed_mean

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _update(seed: int, rank: int = 4, out: int = 12, inp: int = 10, head: bool = True, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    mods = {
        f"l{i}.q": ModuleFactors(
            A=torch.randn(rank, inp, generator=g) * scale,
            B=torch.randn(out, rank, generator=g) * scale,
            alpha=float(rank),
        )
        for i in range(2)
    }
    extras = {"classifier.weight": torch.randn(3, out, generator=g)} if head else {}
    return LoraFactors(modules=mods, extras=extras)


def _close(a: LoraFactors, b: LoraFactors, **tol) -> None:
    ka, kb = dict(a.tensors()), dict(b.tensors())
    assert ka.keys() == kb.keys()
    for k in ka:
        torch.testing.assert_close(ka[k].double(), kb[k].double(), **(tol or TOL), msg=k)


def _dense(f: LoraFactors) -> dict[str, torch.Tensor]:
    return {n: m.B.double() @ m.A.double() for n, m in f.modules.items()}


weights_st = st.lists(st.floats(0.1, 50.0), min_size=1, max_size=7)


# ---------------------------------------------------------------------------------- fold == batch
@given(weights=weights_st, order=st.randoms(use_true_random=False))
def test_weighted_mean_folded_in_any_order_equals_the_batch_mean(weights, order):
    ups = [_update(i) for i in range(len(weights))]
    want = weighted_mean(ups, weights)
    idx = list(range(len(ups)))
    order.shuffle(idx)
    _close(batch(WeightedMean(), [ups[i] for i in idx], [weights[i] for i in idx]).finish(), want)


@given(ranks=st.lists(st.integers(1, 6), min_size=1, max_size=6), order=st.randoms(use_true_random=False))
def test_hetlora_zero_padded_fold_equals_the_batch_in_any_order(ranks, order):
    ups = [_update(i, rank=r) for i, r in enumerate(ranks)]
    weights = [float(1 + i % 3) for i in range(len(ups))]
    want = aggregate_zero_padded(ups, weights, max(ranks), sparsity_weighted=True)
    idx = list(range(len(ups)))
    order.shuffle(idx)
    got = batch(ZeroPaddedMean(8), [ups[i] for i in idx], [weights[i] for i in idx]).finish()
    _close(got, want)


def test_hetlora_fold_weights_each_update_by_its_product_norm_and_falls_back_when_all_are_zero():
    small, big = _update(1, scale=0.1), _update(2, scale=1.0)
    got = batch(ZeroPaddedMean(4), [small, big], [1.0, 1.0]).finish()
    # per module: the weights are ||B_k A_k|| / sum: the big update dominates far beyond 1/2
    for name, m in got.modules.items():
        n_s = float(torch.linalg.matrix_norm(small.modules[name].B @ small.modules[name].A))
        n_b = float(torch.linalg.matrix_norm(big.modules[name].B @ big.modules[name].A))
        want = (n_s * small.modules[name].A + n_b * big.modules[name].A) / (n_s + n_b)
        torch.testing.assert_close(m.A, want, rtol=1e-5, atol=1e-6)
    zero_b = [
        LoraFactors(
            modules={n: ModuleFactors(A=m.A, B=torch.zeros_like(m.B), alpha=m.alpha) for n, m in u.modules.items()}
        )
        for u in (small, big)
    ]
    plain = batch(ZeroPaddedMean(4), zero_b, [1.0, 3.0]).finish()
    for name, m in plain.modules.items():
        torch.testing.assert_close(m.A, (small.modules[name].A + 3 * big.modules[name].A) / 4)
    zero_a = [  # every product zero through A: the plain weighted mean of the B's too
        LoraFactors(
            modules={n: ModuleFactors(A=torch.zeros_like(m.A), B=m.B, alpha=m.alpha) for n, m in u.modules.items()}
        )
        for u in (small, big)
    ]
    plain_b = batch(ZeroPaddedMean(4), zero_a, [1.0, 3.0]).finish()
    unweighted = batch(ZeroPaddedMean(4, sparsity_weighted=False), [small, big], [1.0, 3.0]).finish()
    for name in plain_b.modules:
        s, b = small.modules[name], big.modules[name]
        torch.testing.assert_close(plain_b.modules[name].B, (s.B + 3 * b.B) / 4)
        torch.testing.assert_close(unweighted.modules[name].A, (s.A + 3 * b.A) / 4)
        torch.testing.assert_close(unweighted.modules[name].B, (s.B + 3 * b.B) / 4)


@pytest.mark.parametrize("rank", [None, 3])
def test_exact_product_sum_is_flora_stacking_and_flexlora_svd(rank):
    ups = [_update(i, rank=r) for i, r in enumerate([2, 4, 3])]
    weights = [1.0, 2.0, 5.0]
    got = batch(ExactProductSum(), ups, weights).result(rank)
    want = aggregate_stacked(ups, weights) if rank is None else aggregate_svd(ups, weights, rank)
    for n in got.modules:
        torch.testing.assert_close(_dense(got)[n], _dense(want)[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.extras["classifier.weight"], want.extras["classifier.weight"])


def test_median_and_trimmed_mean_keep_every_update_and_equal_the_batch_statistic():
    ups = [_update(i, head=False) for i in range(5)]
    _close(batch(KeepAll(coordinate_median), ups, [1.0] * 5).finish(), coordinate_median(ups))
    _close(batch(KeepAll(lambda u: trimmed_mean(u, 0.2)), ups, [1.0] * 5).finish(), trimmed_mean(ups, 0.2))


# ---------------------------------------------------------------------------------- share cap
@given(weights=weights_st, cap=st.sampled_from([0.15, 0.3, 0.5, 0.9]), order=st.randoms(use_true_random=False))
def test_share_cap_folded_equals_water_filling_over_the_whole_round(weights, cap, order):
    ups = [_update(i) for i in range(len(weights))]
    want = weighted_mean(ups, cap_shares(weights, cap))
    idx = list(range(len(ups)))
    order.shuffle(idx)
    fold = ShareCapped(WeightedMean(), cap)
    got = batch(fold, [ups[i] for i in idx], [weights[i] for i in idx]).finish()
    _close(got, want)


def test_share_cap_with_more_replies_than_it_holds_in_any_arrival_order_and_off_at_one():
    """Ten replies against a cap of 0.3 (four held): the light ones are folded as they come, a
    heavier arrival displaces the lightest held one, and the capped round equals water-filling,
    whether the heavy replies come first, last or interleaved. A cap of 1 holds nothing."""
    weights = [1.0, 9.0, 2.0, 30.0, 3.0, 7.0, 4.0, 6.0, 5.0, 40.0]
    ups = [_update(i) for i in range(len(weights))]
    want = weighted_mean(ups, cap_shares(weights, 0.3))
    assert max(cap_shares(weights, 0.3)) == pytest.approx(0.3)  # the cap binds
    for idx in (
        list(range(10)),
        list(range(10))[::-1],
        sorted(range(10), key=lambda i: weights[i]),
        [3, 9, 0, 1, 2, 4, 5, 6, 7, 8],
    ):
        _close(batch(ShareCapped(WeightedMean(), 0.3), [ups[i] for i in idx], [weights[i] for i in idx]).finish(), want)
    off = ShareCapped(WeightedMean(), 1.0)
    _close(batch(off, ups, weights).finish(), weighted_mean(ups, weights))
    assert off.held_max == 0 and not off._held


def test_folds_refuse_what_they_cannot_fold_by_its_sentence_and_take_a_zero_weight():
    """Zero weights fold (and add nothing); all-zero weights, mixed ranks in a one-rank fold, a rank
    past the fold's and a module without B are refused, each by its sentence."""
    ups = [_update(i, head=False) for i in range(3)]
    _close(batch(WeightedMean(), ups, [1.0, 0.0, 2.0]).finish(), weighted_mean([ups[0], ups[2]], [1.0, 2.0]))
    for make in (WeightedMean, lambda: ZeroPaddedMean(4)):
        with pytest.raises(ValueError, match=r"^aggregation weights must have a positive sum; 2 update\(s\) folded"):
            fold = make()
            for u in ups[:2]:
                fold.add(u, 0.0)
            fold.finish()
    with pytest.raises(
        ValueError,
        match="carries different tensors or shapes than the updates folded before it; mixed ranks need a heterogeneous-rank strategy",
    ):
        batch(WeightedMean(), [ups[0], _update(5, rank=3, head=False)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"^l0\.q: rank 5 is above the fold's 4$"):
        ZeroPaddedMean(4).add(_update(6, rank=5, head=False), 1.0)
    no_b = LoraFactors(modules={"l0.q": ModuleFactors(A=torch.ones(2, 10), B=None, alpha=2.0)})
    with pytest.raises(ValueError, match=r"^l0\.q: a heterogeneous-rank fold needs both A and B$"):
        ZeroPaddedMean(4).add(no_b, 1.0)
    hetero = batch(
        ZeroPaddedMean(8, min_rank=1), [_update(7, rank=2, head=False), _update(8, rank=3, head=False)], [1.0, 1.0]
    )
    assert hetero.covered == 3 and hetero.count == 2
    assert {m.rank for m in hetero.finish().modules.values()} == {3} and {
        m.alpha for m in hetero.finish().modules.values()
    } == {3.0}
    capped = batch(ShareCapped(WeightedMean(), 0.5), ups, [1.0, 2.0, 3.0])
    capped.finish()
    assert capped.held_bytes() == capped.inner.held_bytes()  # nothing held once folded


def test_share_cap_holds_at_most_ceil_one_over_cap_updates():
    fold = ShareCapped(WeightedMean(), 0.25)
    for i in range(20):
        fold.add(_update(i), float(i + 1))
        assert len(fold._held) <= 4
    one = sum(t.numel() * 8 for _, t in _update(0).tensors())
    assert fold.held_bytes() <= 5 * one  # the running sum and four held updates, whatever the cohort


def test_a_share_capped_hetlora_round_equals_the_batch_with_capped_weights():
    ups = [_update(i, rank=r) for i, r in enumerate([2, 4, 3, 4, 1])]
    weights = [100.0, 1.0, 2.0, 1.0, 3.0]
    want = aggregate_zero_padded(ups, cap_shares(weights, 0.3), 4)
    _close(batch(ShareCapped(ZeroPaddedMean(4), 0.3), ups, weights).finish(), want)


# ---------------------------------------------------------------------------------- rejection
@pytest.mark.parametrize(
    "make",
    [
        WeightedMean,
        lambda: ZeroPaddedMean(4),
        ExactProductSum,
        lambda: SketchedProductSum(4, 4),
        lambda: DenseProductSum(4),
        lambda: BudgetedProductSum(1, 4, lambda: SketchedProductSum(4, 4)),
        lambda: ShareCapped(WeightedMean(), 0.3),
    ],
)
def test_an_update_that_does_not_fit_leaves_no_trace(make):
    good = [_update(1), _update(2), _update(3)]
    other_modules = LoraFactors(
        modules={"elsewhere": ModuleFactors(A=torch.ones(4, 10), B=torch.ones(12, 4), alpha=4.0)}
    )
    ref = batch(make(), good, [1.0, 2.0, 3.0])
    fold = make()
    fold.add(good[0], 1.0)
    for bad, w in ((other_modules, 1.0), (good[1], float("nan")), (good[1], -1.0)):
        with pytest.raises(ValueError):
            fold.add(bad, w)
    fold.add(good[1], 2.0)
    fold.add(good[2], 3.0)
    product = isinstance(getattr(ref, "inner", ref), (ExactProductSum, SketchedProductSum, DenseProductSum))
    a, b = (ref.result(4), fold.result(4)) if product else (ref.finish(), fold.finish())
    _close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- the sketch
def test_the_sketch_equals_the_exact_path_when_the_summed_update_has_rank_within_the_sketch():
    # 12 clients of ranks 1-3 whose A rows come from one 6-dimensional subspace: the weighted sum
    # of products has rank <= 6 <= k = 4 + 4 (out 40, in 30, so the stack alone would have rank 24).
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 30, generator=g)
    ups, weights = [], []
    for i in range(12):
        r = 1 + i % 3
        ups.append(
            LoraFactors(
                modules={
                    "m": ModuleFactors(
                        A=torch.randn(r, 6, generator=g) @ basis, B=torch.randn(40, r, generator=g), alpha=float(r)
                    )
                },
                extras={"h": torch.randn(2, 3, generator=g)},
            )
        )
        weights.append(float(1 + i % 4))
    sketch = batch(SketchedProductSum(rank=4, oversampling=4, seed=5), ups, weights)
    exact = batch(ExactProductSum(), ups, weights)
    for rank in (4, 6):
        got, want = sketch.result(rank), exact.result(rank)
        rel = float((_dense(got)["m"] - _dense(want)["m"]).norm() / _dense(want)["m"].norm())
        assert rel < 1e-4, (rank, rel)
    assert sketch.last_error < 1e-4  # at rank 6 the truncation loses nothing either
    torch.testing.assert_close(got.extras["h"], want.extras["h"])
    # Sketch memory: (k + l + q) rows per module, not the stack.
    assert sketch.held_bytes() < exact.held_bytes() * 3


@pytest.mark.parametrize("make", [lambda: DenseProductSum(3), lambda: SketchedProductSum(3, 5, seed=2)])
def test_product_sums_read_at_their_own_rank_by_default_with_small_weights_and_refuse_an_empty_round(make):
    """Read without a rank: the fold's own; the sketch up to its whole size; weights summing under 1
    are weights; an all-zero round has no error to report; an empty round is refused."""
    ups = [_update(i, rank=2, head=False) for i in range(4)]
    fold = batch(make(), ups, [0.1, 0.2, 0.05, 0.15])
    own, at3 = fold.result(None), fold.result(3)
    for n in own.modules:
        torch.testing.assert_close(_dense(own)[n], _dense(at3)[n])
        assert own.modules[n].alpha == 3.0 and own.modules[n].A.dtype == own.modules[n].B.dtype == torch.float32
    if isinstance(fold, SketchedProductSum):
        assert fold.result(fold.k).modules["l0.q"].rank == fold.k
        with pytest.raises(ValueError, match=r"^the sketch \(size 8\) cannot give rank 9$"):
            fold.result(9)
    zero = [
        LoraFactors(
            modules={n: ModuleFactors(A=m.A, B=torch.zeros_like(m.B), alpha=m.alpha) for n, m in u.modules.items()}
        )
        for u in ups
    ]
    silent = batch(make(), zero, [1.0] * 4)
    silent.result(2)
    assert getattr(silent, "last_error", 0.0) == 0.0
    with pytest.raises(ValueError, match=r"^aggregation weights must have a positive sum; 0 update\(s\) folded"):
        make().result(2)


def test_the_sketch_of_a_full_rank_sum_is_close_to_the_best_rank_r_and_says_how_close():
    ups = [_update(i, rank=4, out=60, inp=50, head=False) for i in range(30)]
    weights = [1.0] * 30
    exact = batch(ExactProductSum(), ups, weights)
    sketch = batch(SketchedProductSum(rank=4, oversampling=20, seed=1), ups, weights)
    got, best = sketch.result(4), exact.result(4)
    full = aggregate_stacked(ups, [1 / 30] * 30)
    for n in got.modules:
        x = _dense(full)[n]
        err_best = float((x - _dense(best)[n]).norm() / x.norm())
        err_sketch = float((x - _dense(got)[n]).norm() / x.norm())
        assert err_best <= err_sketch <= err_best * 1.25
    assert 0 < sketch.last_error < 1  # the test-sketch estimate of that relative error
    est_true = float(
        sum(((_dense(full)[n] - _dense(got)[n]) ** 2).sum() for n in got.modules) ** 0.5
        / sum((_dense(full)[n] ** 2).sum() for n in got.modules) ** 0.5
    )
    assert sketch.last_error == pytest.approx(est_true, rel=0.5)


def test_a_sketch_is_reproducible_from_its_seed_and_independent_of_arrival_order():
    ups = [_update(i, rank=3) for i in range(6)]
    w = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    a = batch(SketchedProductSum(3, 5, seed=9), ups, w).result(3)
    for perm in itertools.islice(itertools.permutations(range(6)), 0, 720, 240):
        b = batch(SketchedProductSum(3, 5, seed=9), [ups[i] for i in perm], [w[i] for i in perm]).result(3)
        for n in a.modules:
            torch.testing.assert_close(_dense(a)[n], _dense(b)[n], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- the server's path
def _replies(s, profiles, template, rnd, weights):
    from test_privacy import _Reply
    from test_strategy_maths import _local_training, _reply

    from fedlora import codec

    out = []
    for i, prof in enumerate(profiles):
        adapter, _ = s.client_payload(prof, rnd)
        received = codec.decode(codec.encode(adapter, modules=s.module_names), alpha=prof.alpha, modules=s.module_names)
        f = _local_training(received, prof, template, s.sharing_policy, seed=rnd * 10 + i)
        out.append(_Reply(prof.node_id, _reply(s, f, weights[i], prof.rank)))
    return out


def _train_round(s, profiles, replies, rnd):
    from flwr.app import MessageType

    from fedlora.strategies.base import RoundLog

    rl = s.rounds.setdefault(rnd, RoundLog(server_round=rnd))
    rl.sampled = len(profiles)
    rl.sent[MessageType.TRAIN] = [p.node_id for p in profiles]
    s.aggregate_train(rnd, iter(replies))  # a stream, as StreamingGrid hands it over
    return rl


def test_client_level_dp_folded_with_a_fixed_seed_equals_the_batch_release_in_any_order():
    from test_privacy import _dp_strategy

    from fedlora.lora_math import flatten, unflatten
    from fedlora.privacy.client_level import add_to_block, effective_change

    z, clip = 1.5, 0.05
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        cfg, s, profiles, template = _dp_strategy(z, clip)
        start_global = s.global_eff
        replies = _replies(s, profiles, template, 1, [10, 20, 30])
        starts = [s.start_factors(p, 1) for p in profiles]
        updates = [s.validate_reply(p, r.content, 1) for p, r in zip(profiles, replies)]
        _train_round(s, profiles, [replies[i] for i in order], 1)
        results.append(s.global_eff)
    # The batch release written out: clip each change to C, sum, add N(0, (zC)^2) from the round's seed, / m.
    keys, shapes, alpha, rows = flatten([effective_change(st, u.factors, 4) for st, u in zip(starts, updates)])
    total = sum(r * min(1.0, clip / float(r.norm())) for r in rows)
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 1)
    want = add_to_block(
        start_global,
        unflatten((total + torch.randn(total.shape, generator=gen) * z * clip) / 3, keys, shapes, alpha),
        4,
    )
    _close(results[0], want)
    _close(results[1], want)


def test_a_reply_rejected_mid_round_leaves_no_trace_in_the_global_adapter():
    from test_strategy_maths import _setup

    from fedlora.strategies.base import RoundLog  # noqa: F401 - the round log the strategy fills

    for name in ("fedit", "hetlora", "flexlora"):
        ranks = [4, 4, 4] if name == "fedit" else [2, 4, 3]
        _, s, profiles, template = _setup(name, "fixed", ranks, **{"robust.max_client_share": "0.5"})
        _, ref, _, _ = _setup(name, "fixed", ranks, **{"robust.max_client_share": "0.5"})
        replies = _replies(s, profiles, template, 1, [10, 20, 30])
        bad = _replies(s, profiles, template, 1, [10, 20, 30])[1]
        bad.content["arrays"] = replies[0].content["arrays"] if name != "fedit" else bad.content["arrays"]
        bad.content["metrics"]["num-examples"] = 10**9 if name == "fedit" else 20  # over its declared size
        rl = _train_round(s, profiles, [replies[0], bad, replies[2]], 1)
        assert rl.accepted == 2 and any("c1" in x for x in rl.rejected), (name, rl.rejected)
        _train_round(ref, [profiles[0], profiles[2]], [replies[0], replies[2]], 1)
        _close(s.global_eff, ref.global_eff, rtol=0, atol=0)


@pytest.mark.parametrize("budget_mb, form", [("128", "dense"), ("0", "sketch")])
def test_a_large_flexlora_cohort_is_folded_dense_when_it_fits_and_sketched_with_its_error_logged_when_not(
    budget_mb, form
):
    from test_strategy_maths import _setup

    ranks = [2, 4, 3, 4, 1, 2]
    _, s, profiles, template = _setup(
        "flexlora", "fixed", ranks, **{"hetero.sketch_from_clients": "5", "hetero.exact_budget_mb": budget_mb}
    )
    _, ex, _, _ = _setup("flexlora", "fixed", ranks)
    replies = _replies(s, profiles, template, 1, [10, 20, 30, 10, 20, 30])
    rl = _train_round(s, profiles, replies, 1)
    _train_round(ex, profiles, replies, 1)
    assert rl.accepted == 6 and rl.figures["product-fold"] == form
    assert ("sketch-relative-error" in rl.figures) == (form == "sketch")
    # rank sum 16 <= the sketch's k = 4 + 16 (the default oversampling): the sketch is exact here
    for n, m in s.global_eff.modules.items():
        e = ex.global_eff.modules[n]
        rel = float(
            (m.B.double() @ m.A.double() - e.B.double() @ e.A.double()).norm() / (e.B.double() @ e.A.double()).norm()
        )
        assert rel < 1e-4, (n, rel)


def test_share_capped_product_sums_and_held_bytes_count_what_is_held():
    ups = [_update(i, rank=r) for i, r in enumerate([2, 4, 3, 4, 1])]
    weights = [100.0, 1.0, 2.0, 1.0, 3.0]
    got = batch(ShareCapped(ExactProductSum(), 0.3), ups, weights).result(3)
    want = aggregate_svd(ups, cap_shares(weights, 0.3), 3)
    for n in got.modules:
        torch.testing.assert_close(_dense(got)[n], _dense(want)[n], rtol=1e-5, atol=1e-6)
    fold = ShareCapped(WeightedMean(), 0.5)
    one = sum(t.numel() * 4 for _, t in _update(0).tensors())  # float32 updates held as they came
    fold.add(_update(0), 1.0)
    fold.add(_update(1), 2.0)
    assert fold.held_bytes() == 2 * one and fold.inner.held_bytes() == 0
    fold.add(_update(2), 3.0)  # the lightest is folded into the float64 running sum
    assert fold.held_bytes() == 2 * one + 2 * one and fold.count == 3


def test_keep_all_refuses_a_misfit_and_counts_what_it_holds():
    fold = KeepAll(coordinate_median)
    fold.add(_update(0, head=False), 1.0)
    with pytest.raises(ValueError, match="different tensors or shapes"):
        fold.add(_update(1, rank=3, head=False), 1.0)
    with pytest.raises(ValueError, match="weight"):
        fold.add(_update(1, head=False), -1.0)
    fold.add(_update(1, head=False), 1.0)
    assert fold.count == 2 and len(fold.updates) == 2
    assert fold.held_bytes() == 2 * sum(t.numel() * 4 for _, t in _update(0, head=False).tensors())


def test_flora_sketched_and_hetlora_share_capped_read_their_fold_through_the_cap():
    from test_strategy_maths import _setup

    ranks = [2, 4, 3, 4, 1, 2]
    weights = [10, 20, 30, 10, 20, 30]
    _, fl, profiles, template = _setup(
        "flora",
        "fixed",
        ranks,
        **{"hetero.sketch_from_clients": "5", "hetero.exact_budget_mb": "0", "robust.max_client_share": "0.5"},
    )
    _, ex, _, _ = _setup("flora", "fixed", ranks, **{"robust.max_client_share": "0.5"})
    replies = _replies(fl, profiles, template, 1, weights)
    rl = _train_round(fl, profiles, replies, 1)
    _train_round(ex, profiles, replies, 1)
    assert rl.accepted == 6 and "sketch-relative-error" in rl.figures and not rl.aggregation_error
    for n, m in fl.global_eff.modules.items():  # rank sum 16 <= k: the sketch gives the exact product
        e = ex.global_eff.modules[n]
        d, de = m.B.double() @ m.A.double(), e.B.double() @ e.A.double()
        assert float((d - de).norm() / de.norm()) < 1e-4
    _, het, profiles, template = _setup("hetlora", "fixed", [2, 4, 3], **{"robust.max_client_share": "0.6"})
    rl = _train_round(het, profiles, _replies(het, profiles, template, 1, [10, 20, 30]), 1)
    assert rl.accepted == 3 and not rl.aggregation_error and het.global_rank() == 4


def test_the_budgeted_product_sum_stacks_while_replies_fit_then_folds_dense_then_sketches_past_its_budget():
    """FlexLoRA's and FLoRA's fold: the stack (equal to the batch formula) while the held replies
    fit the budget; past it the held replies move into the dense sums when those fit (still exact,
    and flat), else into the sketch (flat, and equal to a sketch fed every reply)."""
    ups = [_update(seed, rank=r, out=20, inp=12) for seed, r in enumerate((2, 3, 4, 2, 3, 4, 2, 3))]
    weights = [1.0 + i for i in range(len(ups))]
    size = sum(t.numel() * t.element_size() for _, t in ups[0].tensors())
    dense_bytes = DenseProductSum.bytes_for(ups[0])
    assert 2 * size < dense_bytes < 6 * size  # so that a budget between them stacks first, then goes dense

    def sketch() -> SketchedProductSum:
        return SketchedProductSum(4, 6, seed=11)

    roomy = BudgetedProductSum(10**9, 4, sketch)
    for u, w in zip(ups, weights):
        roomy.add(u, w)
    assert roomy.path == "exact" and roomy.last_error is None
    want = aggregate_svd(ups, weights, 4)
    _close(roomy.result(4), want)

    for budget, form in ((dense_bytes, "dense"), (dense_bytes - 1, "sketch")):
        fold = BudgetedProductSum(budget, 4, sketch)
        held, paths = [], []
        for u, w in zip(ups, weights):
            fold.add(u, w)
            held.append(fold.held_bytes())
            paths.append(fold.path)
        switch = paths.index(form)
        assert 0 < switch < len(ups) - 2 and fold.count == len(ups), paths
        assert max(held[:switch]) <= budget  # stacking: within the budget
        assert held[switch:] == [held[switch]] * (len(ups) - switch)  # folding: flat, whatever comes
        if form == "dense":
            assert fold.last_error is None and held[switch] == dense_bytes
            for n, d in _dense(fold.result(4)).items():  # exact: the best rank-4 factors of the true sum
                torch.testing.assert_close(d, _dense(want)[n], rtol=1e-5, atol=1e-5)  # the oracle QRs in float32
        else:
            reference = batch(sketch(), ups, weights)
            _close(fold.result(4), reference.result(4))
            assert fold.last_error == pytest.approx(reference.last_error)
    started = BudgetedProductSum(dense_bytes, 4, sketch, stack=False)  # a large cohort starts in the dense sum
    started.add(ups[0], 1.0)
    assert started.path == "dense" and started.held_bytes() == dense_bytes


@given(
    ranks=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    rank=st.integers(1, 8),
    order=st.randoms(use_true_random=False),
)
def test_the_dense_product_sum_is_the_exact_svd_of_the_sum_in_any_order(ranks, rank, order):
    """At a rank, the dense sum equals FlexLoRA's batch formula; read without one (FLoRA), its
    product is the stack's product, at the sum's numerical rank (no zero components)."""
    ups = [_update(i, rank=r) for i, r in enumerate(ranks)]
    weights = [float(1 + i % 4) for i in range(len(ups))]
    idx = list(range(len(ups)))
    order.shuffle(idx)
    fold = batch(DenseProductSum(64), [ups[i] for i in idx], [weights[i] for i in idx])
    want = aggregate_svd(ups, weights, rank)
    got = fold.result(rank)
    summed = _dense(aggregate_stacked(ups, weights))
    for n in got.modules:
        # A rank-r truncation moves by about (rounding x sigma_1 / (sigma_r - sigma_r+1)) when the sum
        # is perturbed by rounding: the tolerance widens as the spectral gap at the cut closes.
        s = torch.linalg.svdvals(summed[n].double())
        gap = float(s[rank - 1] - s[rank]) if rank < len(s) else float(s[rank - 1])
        tol = 1e-5 * max(1.0, float(s[0]) / max(gap, 1e-12))
        torch.testing.assert_close(_dense(got)[n], _dense(want)[n], rtol=1e-5, atol=tol)
        assert got.modules[n].rank == rank
    torch.testing.assert_close(got.extras["classifier.weight"], want.extras["classifier.weight"])
    full = fold.result(None)
    stack = aggregate_stacked(ups, weights)
    assert next(iter(full.modules.values())).rank == min(sum(ranks), 10)  # rank sum, or the width (in = 10)
    for n in full.modules:
        torch.testing.assert_close(_dense(full)[n], _dense(stack)[n], rtol=1e-5, atol=1e-5)


def test_the_share_cap_checks_an_update_as_the_fold_it_wraps_and_reads_through_to_it():
    """ShareCapped.check is its inner fold's (a misfit is refused before anything is held), its
    attributes read through to the inner fold, and one read before the inner fold exists is an
    AttributeError, not an endless recursion."""
    capped = ShareCapped(WeightedMean(), 0.5)
    capped.add(_update(0), 1.0)
    capped.check(_update(1))  # the same shapes fit
    with pytest.raises(ValueError):
        capped.check(_update(2, rank=3))
    inner = ZeroPaddedMean(max_rank=8, min_rank=2)
    assert ShareCapped(inner, 0.5).covered == 0 and ShareCapped(inner, 0.5).min_rank == 2
    with pytest.raises(AttributeError):
        object.__new__(ShareCapped).inner  # noqa: B018

"""The factor maths against hand computation and numpy on small shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import (
    aggregate_stacked,
    aggregate_svd,
    aggregate_zero_padded,
    concat_rank,
    low_rank_svd,
    prune_rank,
    to_client,
    to_effective,
    weighted_mean,
)

OUT, IN = 12, 10


def _client(rank, alpha, seed, head=True):
    g = torch.Generator().manual_seed(seed)
    f = LoraFactors(
        modules={
            "l0.q": ModuleFactors(
                A=torch.randn(rank, IN, generator=g), B=torch.randn(OUT, rank, generator=g), alpha=alpha
            ),
            "l0.v": ModuleFactors(
                A=torch.randn(rank, IN, generator=g), B=torch.randn(OUT, rank, generator=g), alpha=alpha
            ),
        }
    )
    if head:
        f.extras["classifier.weight"] = torch.randn(3, IN, generator=g)
    return f


def _true_mean_delta(clients, weights, name):
    p = np.array(weights, dtype=np.float64) / np.sum(weights)
    return sum(pk * c.modules[name].delta().double().numpy() for pk, c in zip(p, clients))


def test_fedit_weighted_mean_equals_hand_computation():
    cs = [_client(4, 8.0, s) for s in range(3)]
    w = [10, 30, 60]
    agg = weighted_mean(cs, w)
    for name in cs[0].modules:
        for part in ("A", "B"):
            hand = (
                10 * getattr(cs[0].modules[name], part)
                + 30 * getattr(cs[1].modules[name], part)
                + 60 * getattr(cs[2].modules[name], part)
            ) / 100
            assert torch.allclose(getattr(agg.modules[name], part), hand, atol=1e-6)
    hand_head = (
        10 * cs[0].extras["classifier.weight"]
        + 30 * cs[1].extras["classifier.weight"]
        + 60 * cs[2].extras["classifier.weight"]
    ) / 100
    assert torch.allclose(agg.extras["classifier.weight"], hand_head, atol=1e-6)


def test_naive_factor_averaging_is_not_the_average_update():
    """FedIT's documented aggregation error: mean(B) @ mean(A) != mean(B @ A). FLoRA/FlexLoRA remove it."""
    cs = [_client(4, 4.0, s, head=False) for s in range(3)]
    w = [1, 1, 1]
    naive = weighted_mean(cs, w)
    for name in cs[0].modules:
        err = np.abs(naive.modules[name].delta().double().numpy() - _true_mean_delta(cs, w, name)).max()
        assert err > 0.1
    stacked = aggregate_stacked([to_effective(c) for c in cs], w)
    for name in cs[0].modules:
        m = stacked.modules[name]
        assert np.allclose((m.B @ m.A).double().numpy(), _true_mean_delta(cs, w, name), atol=1e-4)


def test_flora_stacking_is_exact_across_ranks_and_scalings():
    cs = [_client(2, 4.0, 0), _client(4, 8.0, 1), _client(8, 8.0, 2)]  # scalings 2, 2, 1
    w = [5, 3, 2]
    stacked = aggregate_stacked([to_effective(c) for c in cs], w)
    for name in cs[0].modules:
        m = stacked.modules[name]
        assert m.rank == 2 + 4 + 8
        assert np.allclose((m.B @ m.A).double().numpy(), _true_mean_delta(cs, w, name), atol=1e-4)


def test_flexlora_returns_best_rank_r_approximation():
    cs = [_client(2, 4.0, 0), _client(4, 8.0, 1), _client(8, 16.0, 2)]
    w = [1, 2, 3]
    for r in (1, 3, 8):
        agg = aggregate_svd([to_effective(c) for c in cs], w, r)
        for name in cs[0].modules:
            dense = _true_mean_delta(cs, w, name)
            U, S, Vt = np.linalg.svd(dense)
            best = (U[:, :r] * S[:r]) @ Vt[:r]
            m = agg.modules[name]
            assert np.allclose((m.B @ m.A).double().numpy(), best, atol=1e-4)
            # truncating the rank-8 aggregate to a client's rank gives that client's best approximation
        big = aggregate_svd([to_effective(c) for c in cs], w, 8)
        client = to_client(big, r, alpha=2.0 * r)
        for name in cs[0].modules:
            dense = _true_mean_delta(cs, w, name)
            U, S, Vt = np.linalg.svd(dense)
            assert np.allclose(client.modules[name].delta().double().numpy(), (U[:, :r] * S[:r]) @ Vt[:r], atol=1e-4)


def test_low_rank_svd_batched_matches_numpy():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(3, 20, 6, generator=g), torch.randn(3, 6, 15, generator=g)
    Bn, An, S = low_rank_svd(B, A, 4)
    for i in range(3):
        s_np = np.linalg.svd((B[i] @ A[i]).double().numpy(), compute_uv=False)
        assert np.allclose(S[i].numpy(), s_np[:4], atol=1e-6)
        assert np.allclose(np.linalg.svd((Bn[i] @ An[i]).double().numpy(), compute_uv=False)[:4], s_np[:4], atol=1e-4)


def test_hetlora_zero_padding_and_sparsity_weights():
    small, big = _client(2, 4.0, 0, head=False), _client(4, 8.0, 1, head=False)
    eff = [to_effective(small), to_effective(big)]
    plain = aggregate_zero_padded(eff, [1, 1], max_rank=4, sparsity_weighted=False)
    m = plain.modules["l0.q"]
    assert m.A.shape == (4, IN) and m.B.shape == (OUT, 4)
    # rows 2..3 of A come only from the rank-4 client (the rank-2 one is zero there)
    assert torch.allclose(m.A[2:], 0.5 * big.modules["l0.q"].A[2:], atol=1e-6)
    weighted = aggregate_zero_padded(eff, [1, 1], max_rank=4, sparsity_weighted=True)
    n_small = torch.linalg.norm(eff[0].modules["l0.q"].B @ eff[0].modules["l0.q"].A)
    n_big = torch.linalg.norm(eff[1].modules["l0.q"].B @ eff[1].modules["l0.q"].A)
    w_big = float(n_big / (n_small + n_big))
    assert torch.allclose(weighted.modules["l0.q"].A[2:], w_big * big.modules["l0.q"].A[2:], atol=1e-5)


def test_to_client_truncates_and_rescales():
    c = _client(8, 16.0, 0)
    eff = to_effective(c)
    back = to_client(eff, 8, 16.0)
    for name in c.modules:
        assert torch.allclose(back.modules[name].B, c.modules[name].B, atol=1e-6)
        assert torch.equal(back.modules[name].A, c.modules[name].A)
    small = to_client(eff, 4, 4.0)  # scaling 1 instead of 2
    m = small.modules["l0.q"]
    assert m.A.shape == (4, IN) and m.B.shape == (OUT, 4)
    assert torch.allclose(m.delta(), 2.0 * c.modules["l0.q"].B[:, :4] @ c.modules["l0.q"].A[:4], atol=1e-5)


def test_concat_rank_adds_updates_exactly():
    a, b = to_effective(_client(2, 2.0, 0)), to_effective(_client(3, 3.0, 1))
    s = concat_rank(a, b)
    for n in a.modules:
        assert torch.allclose(
            s.modules[n].B @ s.modules[n].A,
            a.modules[n].B @ a.modules[n].A + b.modules[n].B @ b.modules[n].A,
            atol=1e-5,
        )


def test_prune_rank_drops_small_tail():
    A = torch.randn(4, IN)
    B = torch.randn(OUT, 4)
    B[:, 3] *= 1e-4
    assert prune_rank(ModuleFactors(A=A, B=B, alpha=4.0), 0.05) == 3
    assert prune_rank(ModuleFactors(A=A, B=torch.randn(OUT, 4), alpha=4.0), 1e-6) == 4


def test_weights_must_be_positive():
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        weighted_mean([_client(2, 2.0, 0)], [0])


def _orthonormal_rows(r: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(IN, r, generator=torch.Generator().manual_seed(3)))
    return q.T.contiguous()


def test_prune_rank_threshold_is_the_tail_share_exactly():
    # Orthonormal A rows, B columns of norms 10, 5, 1, 0.5: contributions 10, 5, 1, 0.5 (total 16.5).
    A = _orthonormal_rows(4)
    B = torch.zeros(OUT, 4)
    for i, n in enumerate([10.0, 5.0, 1.0, 0.5]):
        B[i, i] = n
    m = ModuleFactors(A=A, B=B, alpha=4.0)
    assert prune_rank(m, 0.05) == 3  # 0.5/16.5 = 0.030 < 0.05; 1.5/16.5 = 0.091 is not
    assert prune_rank(m, 0.1) == 2  # 1.5/16.5 < 0.1; 6.5/16.5 is not
    assert prune_rank(m, 0.03) == 4  # 0.5/16.5 = 0.0303 is not below 0.03
    assert prune_rank(m, 0.99) == 1  # never below rank 1


@pytest.mark.parametrize("alpha_mode_alpha", [16.0, None])
def test_pruning_keeps_the_kept_components_update_exactly(alpha_mode_alpha):
    from fedlora.lora_math import prune_to_rank

    f = _client(8, 16.0, 5, head=False)
    new_alpha = 16.0 if alpha_mode_alpha else 16.0 * 6 / 8  # fixed: alpha kept; proportional: alpha follows r
    pruned = prune_to_rank(f, 6, new_alpha)
    for name, m in f.modules.items():
        want = m.scaling * (m.B[:, :6].double() @ m.A[:6].double())
        p = pruned.modules[name]
        assert p.rank == 6 and p.alpha == new_alpha
        assert torch.allclose(p.scaling * (p.B.double() @ p.A.double()), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ property tests


@st.composite
def _factor_sets(draw, same_rank=True):
    k = draw(st.integers(1, 4))
    ranks = [draw(st.integers(1, 5))] * k if same_rank else [draw(st.integers(1, 5)) for _ in range(k)]
    seed = draw(st.integers(0, 10_000))
    weights = [draw(st.floats(0.1, 100.0)) for _ in range(k)]
    alphas = [draw(st.sampled_from([1.0, 4.0, 16.0])) for _ in range(k)]
    return [_client(r, a, seed + i) for i, (r, a) in enumerate(zip(ranks, alphas))], weights


@settings(deadline=None)
@given(_factor_sets(same_rank=False))
def test_stacking_is_exact_for_any_ranks_and_weights(sets):
    clients, w = sets
    eff = [to_effective(c) for c in clients]
    stacked = aggregate_stacked(eff, w)
    for name in clients[0].modules:
        want = _true_mean_delta(clients, w, name)
        got = (stacked.modules[name].B.double() @ stacked.modules[name].A.double()).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert stacked.modules[name].rank == sum(c.modules[name].rank for c in clients)


@settings(deadline=None)
@given(_factor_sets(same_rank=True))
def test_mean_of_identical_updates_is_the_update_and_weights_are_normalised(sets):
    clients, w = sets
    same = [clients[0]] * len(clients)
    mean = weighted_mean(same, w)
    for key, t in clients[0].tensors():
        got = dict(mean.tensors())[key]
        assert torch.allclose(got, t, atol=1e-5, rtol=1e-5)
    scaled = weighted_mean(clients, [x * 7.5 for x in w])
    plain = weighted_mean(clients, w)
    for (k1, t1), (k2, t2) in zip(scaled.tensors(), plain.tensors()):
        assert k1 == k2 and torch.allclose(t1, t2, atol=1e-5, rtol=1e-5)


@settings(deadline=None)
@given(_factor_sets(same_rank=False), st.integers(1, 6))
def test_client_form_round_trip_and_svd_optimality(sets, rank):
    clients, w = sets
    c = clients[0]
    back = to_client(to_effective(c), c.modules["l0.q"].rank, c.modules["l0.q"].alpha)
    for name, m in c.modules.items():
        assert torch.allclose(back.modules[name].delta(), m.delta(), atol=1e-4, rtol=1e-4)
    svd = aggregate_svd([to_effective(x) for x in clients], w, rank)
    for name in c.modules:
        M = _true_mean_delta(clients, w, name)
        U, S, Vt = np.linalg.svd(M)
        best = (U[:, :rank] * S[:rank]) @ Vt[:rank]
        got = (svd.modules[name].B.double() @ svd.modules[name].A.double()).numpy()
        np.testing.assert_allclose(got, best, rtol=1e-3, atol=1e-3 * max(1.0, float(S[0])))


def test_fit_rank_truncates_or_pads_and_block_keeps_each_components_scaling():
    from fedlora.lora_math import block, fit_rank

    f = _client(4, 8.0, 1)
    f.modules["l0.v"].B = None  # a part that is absent stays absent
    up, down = fit_rank(f, 6), fit_rank(f, 2)
    assert up.modules["l0.q"].A.shape == (6, IN) and up.modules["l0.q"].B.shape == (OUT, 6)
    assert (
        torch.equal(up.modules["l0.q"].A[:4], f.modules["l0.q"].A) and float(up.modules["l0.q"].A[4:].abs().sum()) == 0
    )
    assert float(up.modules["l0.q"].B[:, 4:].abs().sum()) == 0
    assert torch.equal(down.modules["l0.q"].B, f.modules["l0.q"].B[:, :2])
    assert down.modules["l0.v"].B is None and torch.equal(down.modules["l0.v"].A, f.modules["l0.v"].A[:2])
    assert up.modules["l0.q"].alpha == 8.0 and set(up.extras) == {"classifier.weight"}
    assert torch.equal(up.extras["classifier.weight"], f.extras["classifier.weight"])
    b = block(_client(8, 16.0, 2), 3)
    assert b.modules["l0.q"].rank == 3 and b.modules["l0.q"].alpha == pytest.approx(16.0 / 8 * 3)
    assert b.modules["l0.q"].scaling == pytest.approx(16.0 / 8)


def test_weighted_mean_checks_every_chunk():
    with pytest.raises(ValueError, match="^weighted_mean needs at least one update$"):
        weighted_mean([], [])
    many = [_client(2, 2.0, i) for i in range(40)]  # two chunks of clients
    odd = _client(2, 2.0, 99)
    odd.modules["l0.x"] = odd.modules.pop("l0.v")
    with pytest.raises(ValueError, match="^update 32 carries different tensors than update 0$"):
        weighted_mean(many[:32] + [odd] + many[33:], [1.0] * 40)
    wide = _client(3, 2.0, 98)
    with pytest.raises(ValueError, match="^updates disagree on tensor shapes; use a heterogeneous-rank strategy$"):
        weighted_mean(many[:32] + [wide] + many[33:], [1.0] * 40)
    mean = weighted_mean(many, [1.0] * 40)
    want = sum(c.modules["l0.q"].A for c in many) / 40
    assert torch.allclose(mean.modules["l0.q"].A, want, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Edge cases the mutation run found untested (benchmarks/results/mutation*.json)
# --------------------------------------------------------------------------------------------
def _one(A, B, alpha):
    from fedlora.factors import LoraFactors, ModuleFactors

    return LoraFactors(modules={"m": ModuleFactors(A=A, B=B, alpha=alpha)})


def test_fit_rank_of_b_only_factors_keeps_a_absent():
    import torch

    from fedlora.lora_math import fit_rank

    out = fit_rank(_one(None, torch.ones(3, 2), 2.0), 4)
    assert out.modules["m"].A is None
    assert torch.equal(out.modules["m"].B, torch.cat([torch.ones(3, 2), torch.zeros(3, 2)], 1))


def test_zero_padded_defaults_to_sparsity_weights_and_handles_zero_and_small_updates():
    import torch

    from fedlora.lora_math import aggregate_zero_padded

    a = _one(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.3]]), 1.0)  # ||BA|| = 0.3
    b = _one(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.1]]), 1.0)  # ||BA|| = 0.1
    default = aggregate_zero_padded([a, b], [1.0, 1.0], 2)
    weighted = aggregate_zero_padded([a, b], [1.0, 1.0], 2, sparsity_weighted=True)
    plain = aggregate_zero_padded([a, b], [1.0, 1.0], 2, sparsity_weighted=False)
    assert torch.equal(default.modules["m"].A, weighted.modules["m"].A)
    # norms sum to 0.4 (< 1): the weights are still normalised norms, 0.75 and 0.25, not the plain 0.5/0.5
    assert torch.allclose(weighted.modules["m"].A, torch.tensor([[0.75, 0.25], [0.0, 0.0]]))
    assert not torch.allclose(weighted.modules["m"].A, plain.modules["m"].A)
    assert weighted.modules["m"].alpha == 2.0
    # every update zero: the weights fall back to the example weights, never 0/0
    z = _one(torch.zeros(1, 2), torch.zeros(1, 1), 1.0)
    out = aggregate_zero_padded([z, z], [1.0, 3.0], 2)
    assert torch.isfinite(out.modules["m"].A).all() and torch.isfinite(out.modules["m"].B).all()


def test_keep_uncovered_each_guard():
    import torch

    from fedlora.factors import LoraFactors, ModuleFactors
    from fedlora.lora_math import keep_uncovered

    new = LoraFactors(
        modules={
            "m": ModuleFactors(A=torch.ones(3, 2), B=torch.ones(2, 3), alpha=3.0),
            "n": ModuleFactors(A=torch.ones(3, 2), B=torch.ones(2, 3), alpha=3.0),
        },
        extras={"h": torch.ones(1)},
    )
    prev_full = ModuleFactors(A=torch.full((3, 2), 7.0), B=torch.full((2, 3), 7.0), alpha=3.0)
    # previous B missing on "m" (FFA-style A-only history would be the mirror case): leave "m" alone,
    # and the loop goes on to "n", which is kept from the previous global past the covered rank.
    prev = LoraFactors(modules={"m": ModuleFactors(A=torch.full((3, 2), 7.0), B=None, alpha=3.0), "n": prev_full})
    out = keep_uncovered(new, prev, 1)
    assert torch.equal(out.modules["m"].A, torch.ones(3, 2))
    assert torch.equal(out.modules["n"].A[1:], torch.full((2, 2), 7.0)) and torch.equal(
        out.modules["n"].A[:1], torch.ones(1, 2)
    )
    assert out.modules["n"].alpha == 3.0 and torch.equal(out.extras["h"], torch.ones(1))
    prev_no_a = LoraFactors(modules={"m": ModuleFactors(A=None, B=torch.full((2, 3), 7.0), alpha=3.0), "n": prev_full})
    assert torch.equal(keep_uncovered(new, prev_no_a, 1).modules["m"].B, torch.ones(2, 3))
    # covered_rank equal to the rank: nothing is uncovered
    assert torch.equal(keep_uncovered(new, prev, 3).modules["n"].A, torch.ones(3, 2))
    # covered_rank just below the rank: the last component is the previous one
    assert torch.equal(keep_uncovered(new, prev, 2).modules["n"].A[2], torch.full((2,), 7.0))


def test_prune_to_rank_keeps_the_head_and_refuses_half_factors_by_name():
    import pytest
    import torch

    from fedlora.factors import LoraFactors, ModuleFactors
    from fedlora.lora_math import prune_to_rank

    f = LoraFactors(
        modules={"m": ModuleFactors(A=torch.ones(4, 2), B=torch.ones(2, 4), alpha=4.0)}, extras={"head": torch.ones(2)}
    )
    assert torch.equal(prune_to_rank(f, 2, 4.0).extras["head"], torch.ones(2))
    for A, B in ((None, torch.ones(2, 4)), (torch.ones(4, 2), None)):
        with pytest.raises(ValueError, match="m: pruning needs both A and B"):
            prune_to_rank(LoraFactors(modules={"m": ModuleFactors(A=A, B=B, alpha=4.0)}), 2, 4.0)


def test_low_rank_svd_unbatched_and_batched_padding_shapes():
    import torch

    from fedlora.lora_math import low_rank_svd

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)  # rank-2 product, one module
    Bn, An, S = low_rank_svd(B, A, 4)  # asks for more than the product has: zero-padded
    assert Bn.shape == (6, 4) and An.shape == (4, 5) and S.shape == (4,)
    assert torch.allclose(Bn @ An, B @ A, atol=1e-5) and float(S[2:].abs().sum()) == 0.0
    Bb, Ab = torch.stack([B, 2 * B]), torch.stack([A, A])  # a batch of two modules
    Bn, An, S = low_rank_svd(Bb, Ab, 3)
    assert Bn.shape == (2, 6, 3) and An.shape == (2, 3, 5) and S.shape == (2, 3)
    assert torch.allclose(Bn @ An, Bb @ Ab, atol=1e-5)


def test_prune_rank_never_goes_below_one_and_the_config_bounds_the_ratio(tmp_path):
    import pytest
    import torch

    from fedlora.config import ConfigError, FedLoraConfig
    from fedlora.factors import ModuleFactors
    from fedlora.lora_math import prune_rank

    m = ModuleFactors(A=torch.ones(3, 4), B=torch.ones(5, 3), alpha=3.0)
    assert prune_rank(m, 2.0) == 1  # even a ratio no component can meet keeps one component
    for bad in ("0.0", "1.0", "1.5"):
        with pytest.raises(ConfigError, match="hetero.hetlora_prune_ratio"):
            FedLoraConfig.load(None, [f"hetero.hetlora_prune_ratio={bad}"])


def test_small_updates_are_pruned_too_and_concat_keeps_effective_alpha_and_empty_aggregations_say_so():
    import pytest
    import torch

    from fedlora.factors import ModuleFactors
    from fedlora.lora_math import check_same_tensors, concat_rank, prune_rank, weighted_mean

    # norms far below 1: the tail component (share 0.01) is still pruned at ratio 0.05
    tiny = ModuleFactors(A=torch.diag(torch.tensor([0.1, 0.09, 0.001])), B=torch.eye(3) * 0.1, alpha=3.0)
    assert prune_rank(tiny, 0.05) == 2
    a = _one(torch.ones(2, 5), torch.ones(4, 2), 2.0)
    b = _one(torch.ones(3, 5), torch.ones(4, 3), 3.0)
    out = concat_rank(a, b).modules["m"]
    assert out.rank == 5 and out.alpha == 5.0  # effective form: alpha is the rank, not the fan-in (5 here too)
    c = _one(torch.ones(2, 7), torch.ones(4, 2), 2.0)
    assert concat_rank(c, c).modules["m"].alpha == 4.0
    with pytest.raises(ValueError, match="aggregation needs at least one update"):
        check_same_tensors([])
    with pytest.raises(ValueError, match="weighted_mean needs at least one update"):
        weighted_mean([], [])

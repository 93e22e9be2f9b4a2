"""Every strategy, numerically, through the server's real path: codec -> validate_reply ->
aggregate -> client_payload, for two or three rounds, both alpha modes, non-uniform example
counts, heads included, against an explicit dense (out x in) computation in float64.

A wrong formula in any strategy (heads averaged without weights, HetLoRA ignoring example
counts or dropping the head, a wrong scaling, a stale global) fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from fedlora import codec
from fedlora.config import FedLoraConfig
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.protocol import NodeProfile
from fedlora.registry import get_strategy
from fedlora.strategies.base import Update

IN, OUT, NLAB = 10, 12, 3
NAMES = ["l0.query", "l0.value", "l1.query"]
WEIGHTS = [10, 30, 60]
TOL = dict(rtol=2e-5, atol=2e-5)


def _cfg(strategy: str, alpha_mode: str, ranks: list[int], **extra: str) -> FedLoraConfig:
    sets = [
        f"federation.strategy={strategy}",
        "lora.rank=4",
        "lora.alpha=8",
        f"lora.alpha_mode={alpha_mode}",
        "federation.num_clients=3",
        "federation.min_train_clients=3",
    ]
    if len(set(ranks)) > 1:
        sets.append(f"hetero.client_ranks={ranks}")
    return FedLoraConfig.load(None, sets + [f"{k}={v}" for k, v in extra.items()])


def _template(rank: int, seed: int = 99) -> LoraFactors:
    """What the server's model builds from lora.init_seed: A random, B zero, a head."""
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        modules={
            n: ModuleFactors(A=torch.randn(rank, IN, generator=g) * 0.3, B=torch.zeros(OUT, rank), alpha=8.0)
            for n in NAMES
        },
        extras={"classifier.weight": torch.randn(NLAB, IN, generator=g) * 0.02, "classifier.bias": torch.zeros(NLAB)},
    )


def _setup(strategy: str, alpha_mode: str, ranks: list[int], **extra: str):
    cfg = _cfg(strategy, alpha_mode, ranks, **extra)
    r_ref = max(ranks)
    template = _template(r_ref)
    s = get_strategy(strategy)(cfg, template)
    from fedlora.lora_math import to_effective

    s.global_eff = s.initial_global(to_effective(template))
    profiles = [
        NodeProfile(
            node_id=100 + i,
            client_id=f"c{i}",
            partition_id=i,
            rank=r,
            alpha=cfg.lora.alpha_for_rank(r),
            num_train=1000,
            num_test=10,
        )
        for i, r in enumerate(ranks)
    ]
    for p in profiles:
        s.profiles[p.node_id] = p
    return cfg, s, profiles, template


def _local_training(received: LoraFactors, prof: NodeProfile, template: LoraFactors, policy, seed: int) -> LoraFactors:
    """A client's start (seed init, then what it received) moved by a random step on trained parts."""
    g = torch.Generator().manual_seed(seed)
    start = LoraFactors(
        modules={
            n: ModuleFactors(A=m.A[: prof.rank].clone(), B=torch.zeros(OUT, prof.rank), alpha=prof.alpha)
            for n, m in template.modules.items()
        },
        extras={k: v.clone() for k, v in template.extras.items()},
    ).merged_with(received)
    out = LoraFactors(extras={k: v + torch.randn(v.shape, generator=g) * 0.1 for k, v in start.extras.items()})
    for n, m in start.modules.items():
        A = m.A + (torch.randn(m.A.shape, generator=g) * 0.1 if "A" in policy.trained else 0)
        B = m.B + (torch.randn(m.B.shape, generator=g) * 0.1 if "B" in policy.trained else 0)
        out.modules[n] = ModuleFactors(A=A, B=B, alpha=prof.alpha)
    return out


def _reply(strategy, f: LoraFactors, n: int, rank: int) -> RecordDict:
    sent = f.select(strategy.sharing_policy.shared)
    return RecordDict(
        {
            "arrays": codec.encode(sent, modules=strategy.module_names),
            "metrics": MetricRecord({"num-examples": n, "rank": rank}),
        }
    )


def _dense(m: ModuleFactors) -> np.ndarray:
    return (m.scaling * (m.B.double() @ m.A.double())).numpy()


def _eff_dense(m: ModuleFactors) -> np.ndarray:
    """A global (effective) module: its plain product is the update."""
    return (m.B.double() @ m.A.double()).numpy()


def _run_round(s, profiles, template, rnd: int):
    """One round through the real server path; returns (what each client trained, updates)."""
    trained, updates = [], []
    for i, prof in enumerate(profiles):
        adapter, base = s.client_payload(prof, rnd)
        # What the client decodes from the wire (float32, its own alpha).
        rec = codec.encode(adapter, modules=s.module_names)
        received = codec.decode(rec, alpha=prof.alpha, modules=s.module_names)
        f = _local_training(received, prof, template, s.sharing_policy, seed=rnd * 10 + i)
        trained.append(f)
        u = s.validate_reply(prof, _reply(s, f, WEIGHTS[i], prof.rank))
        assert isinstance(u, Update) and u.weight == WEIGHTS[i]
        updates.append(u)
    s.aggregate(rnd, updates)
    return trained, updates


def _p() -> np.ndarray:
    w = np.array(WEIGHTS, dtype=np.float64)
    return w / w.sum()


def _check_head(s, trained, p):
    for k in trained[0].extras:
        want = sum(pk * t.extras[k].double().numpy() for pk, t in zip(p, trained))
        np.testing.assert_allclose(s.global_eff.extras[k].double().numpy(), want, **TOL)


ALPHA_MODES = ["fixed", "proportional"]


@pytest.mark.parametrize("alpha_mode", ALPHA_MODES)
def test_fedit_averages_a_and_b_separately_weighted_with_the_head(alpha_mode):
    cfg, s, profiles, template = _setup("fedit", alpha_mode, [4, 4, 4])
    p = _p()
    for rnd in (1, 2, 3):
        trained, _ = _run_round(s, profiles, template, rnd)
        for n in NAMES:
            A = sum(pk * t.modules[n].A.double().numpy() for pk, t in zip(p, trained))
            B = sum(pk * t.modules[n].scaling * t.modules[n].B.double().numpy() for pk, t in zip(p, trained))
            np.testing.assert_allclose(_eff_dense(s.global_eff.modules[n]), B @ A, **TOL)
            # FedIT's product of averages is *not* the average of products (the aggregation error).
            avg_products = sum(pk * _dense(t.modules[n]) for pk, t in zip(p, trained))
            assert not np.allclose(B @ A, avg_products, atol=1e-3)
        _check_head(s, trained, p)
        # The next round's payload, in a client's own form, reproduces the global update.
        adapter, base = s.client_payload(profiles[0], rnd + 1)
        assert base is None
        for n in NAMES:
            np.testing.assert_allclose(_dense(adapter.modules[n]), _eff_dense(s.global_eff.modules[n]), **TOL)


@pytest.mark.parametrize("alpha_mode", ALPHA_MODES)
def test_fedsa_averages_only_a_and_sends_only_a(alpha_mode):
    cfg, s, profiles, template = _setup("fedsa", alpha_mode, [4, 4, 4])
    p = _p()
    for rnd in (1, 2):
        trained, updates = _run_round(s, profiles, template, rnd)
        assert all(u.factors.parts() == {"A"} for u in updates)
        for n in NAMES:
            A = sum(pk * t.modules[n].A.double().numpy() for pk, t in zip(p, trained))
            np.testing.assert_allclose(s.global_eff.modules[n].A.double().numpy(), A, **TOL)
            assert s.global_eff.modules[n].B is None
        assert not s.global_eff.extras
        adapter, _ = s.client_payload(profiles[1], rnd + 1)
        assert adapter.parts() == {"A"}
        for n in NAMES:
            np.testing.assert_allclose(
                adapter.modules[n].A.double().numpy(), s.global_eff.modules[n].A.double().numpy(), **TOL
            )


@pytest.mark.parametrize("alpha_mode", ALPHA_MODES)
def test_ffa_averages_b_on_the_frozen_seed_a_exactly(alpha_mode):
    cfg, s, profiles, template = _setup("ffa", alpha_mode, [4, 4, 4])
    p = _p()
    for rnd in (1, 2, 3):
        trained, updates = _run_round(s, profiles, template, rnd)
        assert all("A" not in u.factors.parts() for u in updates)
        for n in NAMES:
            # A is the frozen seed A: the average of the products is exact.
            want = sum(pk * _dense(t.modules[n]) for pk, t in zip(p, trained))
            A0 = template.modules[n].A.double().numpy()
            np.testing.assert_allclose(s.global_eff.modules[n].B.double().numpy() @ A0, want, **TOL)
        _check_head(s, trained, p)
        adapter, _ = s.client_payload(profiles[2], rnd + 1)
        assert "A" not in adapter.parts()


def _hetlora_expected(trained, p, max_rank, name):
    """HetLoRA by hand: pad effective factors, weights ~ n_k * ||s_k B_k A_k||_F."""
    norms = np.array([np.linalg.norm(_dense(t.modules[name])) for t in trained])
    w = p * norms
    w = w / w.sum()
    A = np.zeros((max_rank, IN))
    B = np.zeros((OUT, max_rank))
    for wk, t in zip(w, trained):
        m = t.modules[name]
        A[: m.rank] += wk * m.A.double().numpy()
        B[:, : m.rank] += wk * m.scaling * m.B.double().numpy()
    return A, B


@pytest.mark.parametrize("alpha_mode", ALPHA_MODES)
def test_hetlora_pads_and_weights_by_examples_times_update_norm(alpha_mode):
    cfg, s, profiles, template = _setup("hetlora", alpha_mode, [2, 4, 8])
    p = _p()
    for rnd in (1, 2, 3):
        trained, _ = _run_round(s, profiles, template, rnd)
        for n in NAMES:
            A, B = _hetlora_expected(trained, p, 8, n)
            np.testing.assert_allclose(s.global_eff.modules[n].A.double().numpy(), A, **TOL)
            np.testing.assert_allclose(s.global_eff.modules[n].B.double().numpy(), B, **TOL)
        _check_head(s, trained, p)  # the head: example-weighted, not sparsity-weighted, and kept
        for prof in profiles:  # each client gets the first r_k components, in its own scaling
            adapter, _ = s.client_payload(prof, rnd + 1)
            for n in NAMES:
                g = s.global_eff.modules[n]
                want = g.B[:, : prof.rank].double().numpy() @ g.A[: prof.rank].double().numpy()
                np.testing.assert_allclose(_dense(adapter.modules[n]), want, **TOL)


def test_hetlora_keeps_components_no_sampled_client_covers():
    cfg, s, profiles, template = _setup("hetlora", "fixed", [2, 4, 8])
    _run_round(s, profiles, template, 1)
    before = {n: (s.global_eff.modules[n].A.clone(), s.global_eff.modules[n].B.clone()) for n in NAMES}
    _run_round(s, profiles[:1], template, 2)  # only the rank-2 client is sampled
    for n in NAMES:
        A0, B0 = before[n]
        g = s.global_eff.modules[n]
        assert torch.equal(g.A[2:], A0[2:]) and torch.equal(g.B[:, 2:], B0[:, 2:])
        assert float(g.A[2:].norm()) > 0 and float(g.B[:, 2:].norm()) > 0
    # The paper's formula (option off) zeroes them: both A rows and B columns, so no gradient ever again.
    cfg, s, profiles, template = _setup("hetlora", "fixed", [2, 4, 8], **{"hetero.hetlora_keep_uncovered": "false"})
    _run_round(s, profiles, template, 1)
    _run_round(s, profiles[:1], template, 2)
    for n in NAMES:
        g = s.global_eff.modules[n]
        assert float(g.A[2:].abs().sum()) == 0 and float(g.B[:, 2:].abs().sum()) == 0


@pytest.mark.parametrize("alpha_mode", ALPHA_MODES)
def test_flora_stacks_exactly_and_sends_the_cumulative_delta(alpha_mode):
    cfg, s, profiles, template = _setup("flora", alpha_mode, [2, 4, 8], **{"hetero.flora_max_rank": 1000})
    p = _p()
    cumulative = {n: np.zeros((OUT, IN)) for n in NAMES}
    for rnd in (1, 2, 3):
        trained, _ = _run_round(s, profiles, template, rnd)
        for n in NAMES:
            cumulative[n] += sum(pk * _dense(t.modules[n]) for pk, t in zip(p, trained))
            np.testing.assert_allclose(_eff_dense(s.global_eff.modules[n]), cumulative[n], **TOL)
            assert s.global_eff.modules[n].rank == rnd * 14
        _check_head(s, trained, p)
        head, base = s.client_payload(profiles[0], rnd + 1)
        assert not head.modules and set(head.extras) == set(trained[0].extras)
        for n in NAMES:
            np.testing.assert_allclose(_eff_dense(base.modules[n]), cumulative[n], **TOL)


def _best_rank(M: np.ndarray, r: int) -> np.ndarray:
    U, S, Vt = np.linalg.svd(M)
    return (U[:, :r] * S[:r]) @ Vt[:r]


@pytest.mark.parametrize("alpha_mode", ALPHA_MODES)
def test_flexlora_sends_each_client_the_best_approximation_at_its_rank(alpha_mode):
    cfg, s, profiles, template = _setup("flexlora", alpha_mode, [2, 4, 8])
    p = _p()
    for rnd in (1, 2):
        trained, _ = _run_round(s, profiles, template, rnd)
        for n in NAMES:
            avg = sum(pk * _dense(t.modules[n]) for pk, t in zip(p, trained))
            np.testing.assert_allclose(_eff_dense(s.global_eff.modules[n]), _best_rank(avg, 8), **TOL)
            for prof in profiles:
                adapter, _ = s.client_payload(prof, rnd + 1)
                np.testing.assert_allclose(_dense(adapter.modules[n]), _best_rank(avg, prof.rank), rtol=1e-4, atol=1e-4)
        _check_head(s, trained, p)


def test_flora_start_is_the_rounds_fresh_adapter_and_the_global_head():
    from fedlora.factors import seeded_A
    from fedlora.robust import update_norm

    cfg, s, profiles, template = _setup("flora", "fixed", [2, 4, 8], **{"hetero.flora_max_rank": 1000})
    _run_round(s, profiles, template, 1)
    prof = profiles[1]
    start = s.start_factors(prof, 2)
    assert set(start.modules) == set(NAMES)  # every adapted module, not an empty adapter
    for n, m in start.modules.items():
        assert torch.equal(m.A, seeded_A(cfg.lora.init_seed + 2, n, prof.rank, IN))
        assert m.B.shape == (OUT, prof.rank) and float(m.B.abs().sum()) == 0 and m.alpha == prof.alpha
    for k, t in s.global_eff.extras.items():
        assert torch.equal(start.extras[k], t)
    assert update_norm(start, start) == 0.0
    assert s.global_rank_of(s.global_eff) == 14 and s.global_rank_of(LoraFactors()) == 0


def test_flora_caps_the_cumulative_rank_with_the_best_approximation_and_only_above_the_cap():
    from fedlora.lora_math import to_effective

    # ranks 2+4+8 stack to 14 per round. A cap of exactly 14 keeps round 1's exact stacking: A is the
    # clients' A one below the other, untouched by any SVD.
    cfg, s, profiles, template = _setup("flora", "fixed", [2, 4, 8], **{"hetero.flora_max_rank": 14})
    head, base = s.client_payload(profiles[0], 1)
    assert base is None  # nothing merged into the base before the first aggregation
    trained, _ = _run_round(s, profiles, template, 1)
    for n in NAMES:
        stacked_a = torch.cat([to_effective(t).modules[n].A for t in trained], 0)
        assert torch.allclose(s.global_eff.modules[n].A, stacked_a, atol=1e-6)
    # A cap of 6: every round ends with the best rank-6 approximation of (previous global + the round's sum).
    cfg, s, profiles, template = _setup("flora", "fixed", [2, 4, 8], **{"hetero.flora_max_rank": 6})
    p = _p()
    previous = {n: np.zeros((OUT, IN)) for n in NAMES}
    for rnd in (1, 2):
        trained, _ = _run_round(s, profiles, template, rnd)
        for n in NAMES:
            total = previous[n] + sum(pk * _dense(t.modules[n]) for pk, t in zip(p, trained))
            assert s.global_eff.modules[n].rank == 6
            previous[n] = _best_rank(total, 6)
            np.testing.assert_allclose(_eff_dense(s.global_eff.modules[n]), previous[n], rtol=1e-4, atol=1e-4)

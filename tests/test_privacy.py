"""Differential privacy: clipping, noise, accounting (checked against independent accountant
calls), DP-SGD with Opacus on the real LoRA model, DyLoRA's per-round rank, bad input."""

from __future__ import annotations

import pytest
import torch
from test_strategy_maths import WEIGHTS, _local_training, _reply, _setup

import fleet
from conftest import make_config
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.factors import LoraFactors
from fedlora.lora_math import to_effective


# ------------------------------------------------------------------------------ client level
def _dp_strategy(z: float, clip: float, **extra):
    sets = {
        "privacy.client_dp": "true",
        "privacy.client_noise_multiplier": z,
        "privacy.client_clip": clip,
        "privacy.noise_seed": 3,
        **extra,
    }
    return _setup("fedit", "fixed", [4, 4, 4], **sets)


def _round(s, profiles, template, rnd, weights=WEIGHTS):
    from flwr.app import MessageType

    from fedlora import codec
    from fedlora.strategies.base import RoundLog

    rl = s.rounds.setdefault(rnd, RoundLog(server_round=rnd))
    rl.sampled = len(profiles)
    rl.sent[MessageType.TRAIN] = [p.node_id for p in profiles]
    replies = []
    for i, prof in enumerate(profiles):
        adapter, _ = s.client_payload(prof, rnd)
        received = codec.decode(codec.encode(adapter, modules=s.module_names), alpha=prof.alpha, modules=s.module_names)
        f = _local_training(received, prof, template, s.sharing_policy, seed=rnd * 10 + i)
        replies.append(_Reply(prof.node_id, _reply(s, f, weights[i], prof.rank)))
    s.aggregate_train(rnd, replies)
    return rl


def _Reply(node: int, content):
    return fleet.train_reply(node, content, message_id=f"m{node}")


def _flat(f: LoraFactors) -> torch.Tensor:
    return torch.cat([t.flatten().double() for _, t in to_effective(f).tensors()])


def test_every_client_update_is_clipped_to_the_bound():
    from fedlora.privacy.client_level import effective_change

    cfg, s, profiles, template = _dp_strategy(0.0, 0.05)
    before = _flat(s.global_eff)
    rl = _round(s, profiles[:1], template, 1)  # one client: the released change is its clipped update
    change = _flat(s.global_eff) - before
    assert rl.figures["clients-clipped"] == 1 and rl.figures["client-update-norm-mean"] > 0.05
    far = rl.figures["client-update-norm-mean"] > 10 * 0.05
    assert rl.figures["clients-far-beyond-clip"] == int(far)  # one update: its norm against 10 C
    assert float(change.norm()) == pytest.approx(0.05, rel=1e-5)
    start = s.start_factors(profiles[0], 2)  # what the client starts from now: the new global
    assert all(float(t.abs().sum()) == 0.0 for _, t in effective_change(start, start, 4).tensors())


def test_dp_with_no_noise_and_no_clipping_equals_the_plain_average():
    cfg, dp, profiles, template = _dp_strategy(0.0, 1e9)
    _, plain, profiles2, template2 = _setup("fedit", "fixed", [4, 4, 4])
    for rnd in (1, 2):
        _round(dp, profiles, template, rnd, weights=[10, 10, 10])
        _round(plain, profiles2, template2, rnd, weights=[10, 10, 10])
        for (k1, a), (k2, b) in zip(dp.global_eff.tensors(), plain.global_eff.tensors()):
            assert k1 == k2 and torch.allclose(a, b, atol=1e-6), k1


def test_noise_has_the_promised_scale():
    cfg, s, profiles, template = _dp_strategy(2.0, 0.01)
    before = _flat(s.global_eff)
    _round(s, profiles, template, 1)
    diff = _flat(s.global_eff) - before
    # mean of 3 clipped updates (norm <= 0.01 / 3 each in the mean) + noise of std z*C/m per coordinate
    std = 2.0 * 0.01 / 3
    assert float(diff.std()) == pytest.approx(std, rel=0.1)


def _dp(strategy):
    return next(e for e in strategy.extensions if e.name == "client-dp").mechanism


def test_client_epsilon_matches_an_independent_accountant_and_never_decreases():
    import dp_accounting

    cfg, s, profiles, template = _dp_strategy(1.3, 0.1)
    eps = []
    for rnd in (1, 2, 3):
        rl = _round(s, profiles, template, rnd)
        eps.append(rl.figures["client-epsilon"])
    assert eps == sorted(eps) and eps[0] > 0
    # The same release, accounted directly with Google's dp_accounting: 3 rounds, 3 of 3 clients
    # sampled without replacement, replace-one, noise multiplier z/2 relative to the 2C sensitivity.
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(3, 3, dp_accounting.GaussianDpEvent(1.3 / 2))
    acc.compose(event, 3)
    assert eps[-1] == pytest.approx(acc.get_epsilon(cfg.client_delta()), rel=1e-9)


def test_adaptive_clip_moves_towards_the_quantile():
    cfg, s, profiles, template = _dp_strategy(0.25, 1e-4, **{"privacy.client_clipping": "adaptive"})
    rl = _round(s, profiles, template, 1)
    assert rl.figures["client-clip-next"] > 1e-4  # every update is above a tiny bound: the bound grows
    assert _dp(s).clip == rl.figures["client-clip-next"]


def _start(overrides: list[str]) -> FedLoraConfig:
    """A config loaded and checked as a run's start checks it (the privacy calibration)."""
    from fedlora.privacy.accounting import check_targets

    cfg = FedLoraConfig.load(None, overrides)
    check_targets(cfg)
    return cfg


def test_adaptive_clipping_that_cannot_split_z_is_refused_at_run_start_with_the_figures():
    # The reviewer's case: N = 500, m = 50, target epsilon 1 over 20 rounds calibrates z = 5.606, and the
    # count's noise (std m/20 = 2.5) alone costs noise multiplier 5: the update could get no noise at all.
    with pytest.raises(
        ConfigError,
        match=r"privacy.client_clipping.*z = 5.60.*50 clients.*2 \* m/20 = 5\b.*"
        r"more than 10 \* z = 56",
    ):
        _start(
            [
                "privacy.client_dp=true",
                "privacy.client_clipping=adaptive",
                "privacy.client_target_epsilon=1",
                "federation.num_clients=500",
                "federation.fraction_train=0.1",
                "run.rounds=20",
            ]
        )
    with pytest.raises(ConfigError, match="privacy.client_clipping"):  # a fixed z fares the same
        _start(
            [
                "privacy.client_dp=true",
                "privacy.client_clipping=adaptive",
                "privacy.client_noise_multiplier=0.3",
                "federation.num_clients=3",
            ]
        )
    # the same cohort with fixed clipping, or with enough clients a round, loads
    _start(
        [
            "privacy.client_dp=true",
            "privacy.client_target_epsilon=1",
            "federation.num_clients=500",
            "federation.fraction_train=0.1",
            "run.rounds=20",
        ]
    )
    _start(
        [
            "privacy.client_dp=true",
            "privacy.client_clipping=adaptive",
            "privacy.client_target_epsilon=1",
            "federation.num_clients=1000",
            "federation.fraction_train=0.1",
            "run.rounds=20",
        ]
    )


def test_adaptive_clipping_reports_the_epsilon_of_the_mechanism_it_runs():
    """Count (std sigma_b = m/20, sensitivity 1 under replace-one) and update (std z_delta*C, sensitivity
    2C) composed with Google's dp_accounting equal the reported epsilon; the update's noise has std
    z_delta*C/m, and the round's C, not the next one, scales it."""
    import dp_accounting

    z, clip = 0.25, 1e-4
    cfg, s, profiles, template = _dp_strategy(z, clip, **{"privacy.client_clipping": "adaptive"})
    before = _flat(s.global_eff)
    rl = _round(s, profiles, template, 1)
    sigma_b = 3 / 20
    z_delta = (z**-2 - (2 * sigma_b) ** -2) ** -0.5
    assert rl.figures["client-update-noise-multiplier"] == pytest.approx(z_delta, rel=1e-12)
    diff = _flat(s.global_eff) - before
    assert float(diff.std()) == pytest.approx(z_delta * clip / 3, rel=0.1)
    assert rl.figures["client-clip-next"] != clip  # the next round's bound moved; this one was noised with clip
    for rnd in (2, 3):
        rl = _round(s, profiles, template, rnd)
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    mechanism = dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_delta / 2), dp_accounting.GaussianDpEvent(sigma_b)]
    )
    acc.compose(dp_accounting.SampledWithoutReplacementDpEvent(3, 3, mechanism), 3)
    assert rl.figures["client-epsilon"] == pytest.approx(acc.get_epsilon(cfg.client_delta()), rel=1e-6)


def test_an_adaptive_round_that_samples_too_few_to_split_z_releases_and_spends_nothing():
    cfg, s, profiles, template = _dp_strategy(0.25, 0.05, **{"privacy.client_clipping": "adaptive"})
    before = _flat(s.global_eff)
    rl = _round(s, profiles[:1], template, 1)  # m = 1: sigma_b = 0.05, and z = 0.25 >= 2 sigma_b
    assert "adaptive clipping cannot spend noise multiplier z = 0.25 with 1 clients" in rl.aggregation_error
    assert torch.equal(_flat(s.global_eff), before) and _dp(s).released == 0 and _dp(s).epsilon() == 0.0
    assert _dp(s).clip == 0.05


def test_accountant_state_round_trips():
    from fedlora.privacy.client_level import ClientLevelDP

    cfg, s, profiles, template = _dp_strategy(1.1, 0.1)
    _round(s, profiles, template, 1)
    _round(s, profiles, template, 2)
    again = ClientLevelDP(cfg)
    again.load_state_dict(_dp(s).state_dict())
    assert again.epsilon() == _dp(s).epsilon() and again.released == 2


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["federation.strategy=flora"], "no sum to add noise to"),
        (["federation.strategy=flexlora"], "flexlora redistributes an SVD"),
        (["privacy.delta=0.2"], "must be below 1 / num_clients"),
        (["privacy.client_clip=0"], "privacy.client_clip"),
        (["privacy.client_noise_multiplier=-1"], "privacy.client_noise_multiplier"),
        (["privacy.client_target_epsilon=0.001", "run.rounds=50", "federation.fraction_train=1.0"], "cannot be met"),
        (["dylora.enabled=true", "federation.strategy=hetlora"], "DyLoRA's per-round rank"),
    ],
)
def test_dp_bad_input_fails_before_training(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _start(["privacy.client_dp=true"] + override)


def test_target_epsilon_is_met_by_the_calibrated_noise():
    from fedlora.privacy.accounting import client_epsilon, client_noise_for_target, sampled_per_round

    cfg = FedLoraConfig.load(
        None,
        [
            "privacy.client_dp=true",
            "privacy.client_target_epsilon=3",
            "federation.num_clients=500",
            "federation.fraction_train=0.1",
            "run.rounds=20",
        ],
    )
    z = client_noise_for_target(cfg)
    eps = client_epsilon(z, sampled_per_round(cfg), 500, 20, cfg.client_delta())
    assert eps <= 3.0 and eps > 2.95


# ------------------------------------------------------------------------------ DyLoRA
def test_dylora_round_accepts_only_the_round_rank_and_updates_only_that_block():
    from fedlora.strategies import RejectedReply
    from fedlora.strategies.base import RoundLog

    cfg, s, profiles, template = _setup("fedit", "fixed", [4, 4, 4], **{"dylora.enabled": "true"})
    rl = RoundLog(server_round=1, dylora_rank=2)
    s.rounds[1] = rl
    prof = profiles[0]
    full = _local_training(s.client_payload(prof, 1)[0], prof, template, s.sharing_policy, seed=1)
    from fedlora.lora_math import block

    with pytest.raises(RejectedReply, match="this round's DyLoRA rank is 2"):
        s.validate_reply(prof, _reply(s, full, 10, 4), 1, rl)
    u = s.validate_reply(prof, _reply(s, block(full, 2), 10, 2), 1, rl)
    assert {m.rank for m in u.factors.modules.values()} == {2}
    before = {n: (m.A.clone(), m.B.clone()) for n, m in s.global_eff.modules.items()}
    from flwr.app import MessageType

    rl.sampled, rl.sent[MessageType.TRAIN] = 1, [prof.node_id]
    s.aggregate_train(1, [_Reply(prof.node_id, _reply(s, block(full, 2), 10, 2))])
    for n, m in s.global_eff.modules.items():
        A0, B0 = before[n]
        assert torch.equal(m.A[2:], A0[2:]) and torch.equal(m.B[:, 2:], B0[:, 2:])
        assert not torch.equal(m.A[:2], A0[:2])
        # the block keeps the full adapter's per-component scaling: raw B of the client = global B / (alpha/r)
        assert torch.allclose(m.B[:, :2] / (8.0 / 4), full.modules[n].B[:, :2], atol=1e-6)


@pytest.mark.parametrize("b", [1, 2, 3, 4])
def test_dp_dylora_measures_a_block_change_at_the_full_adapters_scaling(b):
    """At every round rank b: a client whose block equals its start contributes exactly zero, and a
    known change dB of its raw block moves the global effective B by (alpha/r) dB (one client, z = 0,
    no clipping): the block is decoded at alpha*b/r, and the start must be measured at the same
    per-component scaling (an earlier version rescaled it by alpha/b and released -(r/b - 1) B_eff)."""
    from flwr.app import MessageType

    from fedlora.lora_math import block
    from fedlora.strategies.base import RoundLog

    cfg, s, profiles, template = _dp_strategy(0.0, 1e9, **{"dylora.enabled": "true"})
    g = torch.Generator().manual_seed(b)
    for m in s.global_eff.modules.values():  # a trained global adapter: B is not zero
        m.B = torch.randn(m.B.shape, generator=g)
    prof = profiles[0]
    alpha, r = prof.alpha, prof.rank
    for rnd, step in ((1, 0.0), (2, 0.01)):
        rl = RoundLog(server_round=rnd, dylora_rank=b, sampled=1)
        rl.sent[MessageType.TRAIN] = [prof.node_id]
        s.rounds[rnd] = rl
        start = s.client_payload(prof, rnd)[0].merged_with(LoraFactors(extras=dict(template.extras)))
        reply = block(start, b)
        dB = {n: torch.randn(m.B.shape, generator=g) * step for n, m in reply.modules.items()}
        for n, m in reply.modules.items():
            m.B = m.B + dB[n]
        before = {n: m.B.clone() for n, m in s.global_eff.modules.items()}
        s.aggregate_train(rnd, [_Reply(prof.node_id, _reply(s, reply, 10, b))])
        assert not rl.aggregation_error, rl.aggregation_error
        for n, m in s.global_eff.modules.items():
            moved = m.B - before[n]
            assert torch.allclose(moved[:, :b], (alpha / r) * dB[n], atol=1e-6), (b, n, float(moved.abs().max()))
            assert float(moved[:, b:].abs().sum()) == 0.0


def test_dylora_schedule_is_seeded_and_covers_the_ranks():
    from fedlora.dylora import round_rank

    ranks = [round_rank(42, r, 1, 8) for r in range(1, 200)]
    assert ranks == [round_rank(42, r, 1, 8) for r in range(1, 200)]
    assert set(ranks) == set(range(1, 9))


# ------------------------------------------------------------------------------ example level
def _tiny(tmp_path, **train):
    from fedlora.factors import load_factors
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors, set_trainable
    from fedlora.partitions import client_data

    cfg = make_config(tmp_path, train={"optimizer": "sgd", "learning_rate": 0.5, **train})
    m = build_peft_model(cfg, 4, AdapterSpec(4, 8.0, 0.0, ("query", "value")))
    load_factors(m, initial_factors(m, 1))
    params = set_trainable(m, frozenset({"A", "B", "head"}))
    return cfg, m, params, client_data(cfg, 0)


def test_dp_sgd_gives_every_lora_tensor_a_per_sample_gradient_and_moves_it(tmp_path, shared_data):
    from fedlora.factors import extract_factors
    from fedlora.privacy.example_level import DPSGDHook, check_per_sample_gradients
    from fedlora.training import TrainingHook, train_local

    cfg, m, params, cd = _tiny(tmp_path, local_steps=3, batch_size=8)
    before = extract_factors(m)
    seen = {}

    class Spy(TrainingHook):
        def loss(self, ctx, loss):
            seen["model"] = ctx.model
            return loss

    dp = DPSGDHook(0.5, 1.0, 1e-5, noise_seed=0)
    orig_step = None

    def begin_and_spy(ctx):
        DPSGDHook.begin(dp, ctx)
        nonlocal orig_step
        opt = ctx.optimizer
        orig_step = opt.step

        def step(*a, **k):
            if opt.grad_samples and len(opt.grad_samples[0]):
                n = len(opt.grad_samples[0])
                check_per_sample_gradients(dp._params, n)
                seen["checked"] = seen.get("checked", 0) + 1
            return orig_step(*a, **k)

        opt.step = step

    dp.begin = begin_and_spy
    res = train_local(m, params, cd.train, cfg.train, seed=5, device=torch.device("cpu"), hooks=[dp, Spy()])
    assert seen["checked"] >= 1
    after = extract_factors(m)
    for name in before.modules:
        assert not torch.equal(before.modules[name].B, after.modules[name].B)  # B starts at zero and moves
        assert not torch.equal(before.modules[name].A, after.modules[name].A)
    assert res.metrics["dp-sgd-epsilon"] > 0
    assert not hasattr(params[0], "grad_sample")  # the cached model is unwrapped for the next message


def test_dp_sgd_step_equals_the_plain_step_without_noise_or_clipping(tmp_path, shared_data):
    """One full-batch step (sample rate 1 takes every example): same update to float tolerance."""
    from fedlora.factors import extract_factors, load_factors
    from fedlora.privacy.example_level import DPSGDHook
    from fedlora.training import train_local

    cfg, m, params, cd = _tiny(tmp_path, local_steps=1, batch_size=10_000, max_grad_norm=0.0)
    # Dropout masks follow the order of examples in a batch, which Poisson sampling does not keep.
    dropouts = [mod for mod in m.modules() if isinstance(mod, torch.nn.Dropout)]
    saved = [d.p for d in dropouts]
    for d in dropouts:
        d.p = 0.0
    start = extract_factors(m)
    train_local(m, params, cd.train, cfg.train, seed=5, device=torch.device("cpu"), hooks=[])
    plain = extract_factors(m)
    load_factors(m, start)
    train_local(
        m,
        params,
        cd.train,
        cfg.train,
        seed=5,
        device=torch.device("cpu"),
        hooks=[DPSGDHook(0.0, 1e9, 1e-5, noise_seed=0)],
    )
    private = extract_factors(m)
    for d, p in zip(dropouts, saved):
        d.p = p
    for (k, a), (_, b) in zip(plain.tensors(), private.tensors()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), k


def test_empty_poisson_batches_do_not_crash_and_are_accounted(tmp_path, shared_data):
    from fedlora.privacy.accounting import example_epsilon
    from fedlora.privacy.example_level import DPSGDHook
    from fedlora.training import train_local

    cfg, m, params, cd = _tiny(tmp_path, local_steps=40, batch_size=1)
    hook = DPSGDHook(1.0, 1.0, 1e-5, noise_seed=11)
    res = train_local(m, params, cd.train, cfg.train, seed=3, device=torch.device("cpu"), hooks=[hook])
    assert res.metrics["dp-sgd-empty-steps"] > 0
    assert sum(h[2] for h in hook.history) == 40  # every step counted, empty ones too
    assert res.metrics["dp-sgd-epsilon"] == pytest.approx(example_epsilon(hook.history, 1e-5))


def test_example_epsilon_matches_opacus_analysis_directly():
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedlora.privacy.accounting import example_epsilon

    history = [(1.1, 0.05, 40), (1.1, 0.05, 40)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=0.05, noise_multiplier=1.1, steps=80, orders=orders)
    eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)
    assert example_epsilon(history, 1e-5) == pytest.approx(eps, rel=1e-6)


def test_a_restarted_client_resumes_its_dp_sgd_accountant(tmp_path, shared_data, task_identity):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedlora import codec
    from fedlora.clients import session as session_mod
    from fedlora.clients.app import app
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors
    from fedlora.privacy.example_level import STATE_NAME
    from fedlora.state import ClientStateStore

    cfg = make_config(
        tmp_path,
        privacy={"example_dp": True, "example_noise_multiplier": 1.0, "noise_seed": 1},
        train={"local_steps": 3},
        simulation={"state_dir": str(tmp_path / "state")},
    )
    m = build_peft_model(cfg, 4, AdapterSpec(4, 8.0, cfg.lora.dropout, tuple(cfg.lora.target_modules)))
    f = initial_factors(m, cfg.lora.init_seed)
    arrays = codec.encode(f.select({"A", "B", "head"}), modules=sorted(f.modules))

    def run(ctx, rnd):
        msg = Message(
            RecordDict(
                {"arrays": arrays, "config": ConfigRecord({"server-round": rnd, "config-digest": cfg.digest()})}
            ),
            dst_node_id=ctx.node_id,
            message_type="train",
        )
        return app(msg, ctx).content["metrics"]["dp-sgd-epsilon"]

    def fresh():
        ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        app(
            Message(
                RecordDict({"config": ConfigRecord({"action": "setup", "run-config": cfg.to_json()})}),
                dst_node_id=5,
                message_type="query",
            ),
            ctx,
        )
        return ctx

    ctx = fresh()
    e1 = run(ctx, 1)
    session_mod._CONFIGS.clear()  # the client process dies; its store on disk stays
    e2 = run(fresh(), 2)
    stored = ClientStateStore(tmp_path / "state").load("client-00000", STATE_NAME)
    assert sum(h[2] for h in stored["history"]) == 6 and e2 > e1 and stored["epsilon"] == pytest.approx(e2)


# ------------------------------------------------------------------------------ real simulations
def test_dp_sgd_trained_minilm_learns_real_data(tmp_path, shared_data):
    """Opacus issue #820: LoRA trained under DP-SGD must be useful afterwards, not just look trained."""
    from fedlora.simulate import simulate

    cfg = make_config(
        tmp_path,
        model={"name": "builtin:all-MiniLM-L6-v2", "max_length": 32},
        data={"max_train_examples": 300, "max_test_examples": 120},
        train={"local_epochs": 2, "learning_rate": 1e-2, "batch_size": 32},
        federation={"fraction_evaluate": 0.0},  # the server's accuracy is the claim
        privacy={"example_dp": True, "example_noise_multiplier": 0.5, "example_clip": 1.0, "noise_seed": 0},
    )
    rows = simulate(cfg, engine="inprocess").read_metrics()  # Opacus on the clients' training, any engine
    acc = [r["server-accuracy"] for r in rows]
    assert acc[0] < 0.32 and acc[-1] > 0.38 and acc[-1] > acc[0] + 0.08, acc  # chance: 0.25
    eps = [r["dp-sgd-epsilon-max"] for r in rows[1:]]
    assert eps == sorted(eps) and eps[0] > 0


def test_dp_dylora_every_accepted_reply_has_the_round_rank(tmp_path, shared_data):
    cfg = make_config(
        tmp_path,
        run={"rounds": 3},
        lora={"rank": 8, "alpha": 16},
        privacy={"client_dp": True, "client_noise_multiplier": 0.3, "client_clip": 0.5},
        dylora={"enabled": True, "eval_ranks": [1, 8]},
        federation={"server_eval_every": 2},
    )
    run_dir, rows, grid = fleet.run_recorded(
        cfg, engine="inprocess"
    )  # the rank schedule is the apps', not the engine's
    by_round = {r["round"]: r for r in rows}
    # server_eval_every = 2: round 0, every 2nd round and the last are evaluated (at every rank), round 1 is not.
    assert [r["round"] for r in rows if "server-accuracy" in r] == [0, 2, 3]
    assert "server-accuracy-rank-1" not in by_round[1] and "client-epsilon" in by_round[1]
    for m in grid.train_replies():
        if not m.has_error():
            b = int(m.content["metrics"]["rank"])
            rnd = next(
                s.content["config"]["server-round"]
                for s in grid.sent
                if s.metadata.message_id == m.metadata.reply_to_message_id
            )
            assert b == by_round[rnd]["dylora-rank"]
            assert all(arr.shape[0] == b for k, arr in m.content["arrays"].items() if k.endswith("/A"))
    assert all(r["clients-accepted"] == 3 for r in rows[1:])
    eps = [r["client-epsilon"] for r in rows[1:]]
    assert eps == sorted(eps) and "server-accuracy-rank-1" in rows[-1]
    import json

    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["privacy"]["client-level"]["epsilon"] == pytest.approx(eps[-1])

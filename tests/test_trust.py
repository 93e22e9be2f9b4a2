"""Trust scores from the server's own examples (``robust.trust_examples``, fedlora/aggregation/trust.py):
the held-out set, the score, the weights through the real strategy path in any arrival order, the
runs it refuses, and a real simulation where a sign-flipped client is left out and named."""

from __future__ import annotations

import math

import cloudpickle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_robust import _attacked_round

import fleet
from conftest import make_config
from fedlora.aggregation.trust import trust_score
from fedlora.data import Examples, TaskData, hold_out_trust
from fedlora.schema import ConfigError

cloudpickle.register_pickle_by_value(fleet)


# ---------------------------------------------------------------------------------- the server's examples
def _task(labels: list[int]) -> TaskData:
    """Train and test hold the same rows (ids 0.., the labels given): either can be the source."""
    ex = Examples([torch.tensor([i]) for i in range(len(labels))], torch.tensor(labels), task="classification")
    return TaskData(train=ex, test=ex, label_names=[str(k) for k in range(max(labels) + 1)], train_labels=labels)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=80),
    share=st.floats(0.01, 0.99),
    seed=st.integers(0, 99),
    source=st.sampled_from(["train", "eval"]),
)
def test_the_servers_examples_are_out_of_their_split_balanced_and_fixed_by_the_seed(labels, share, seed, source):
    """Every row of the source split is either the server's or still in the split (never both, none
    lost), in the split's order, and the other split is untouched; each label gives min(its rows,
    its turn) examples, so the counts of the labels not used up differ by at most one; the same
    seed picks the same rows."""
    n = max(1, min(len(labels) - 1, round(share * len(labels))))
    task = _task(labels)
    out = hold_out_trust(task, n, seed, source)
    cut, kept = (out.train, out.test) if source == "train" else (out.test, out.train)
    trust_ids = [int(t) for t in out.trust.input_ids]
    left_ids = [int(t) for t in cut.input_ids]
    assert len(trust_ids) == n and sorted(trust_ids + left_ids) == list(range(len(labels)))
    assert left_ids == sorted(left_ids) and cut.labels.tolist() == [labels[i] for i in left_ids]
    assert [int(t) for t in kept.input_ids] == list(range(len(labels)))  # the other split: every row
    assert out.train_labels == out.train.labels.tolist()
    assert out.trust.labels.tolist() == [labels[i] for i in trust_ids]
    got = {k: sum(1 for i in trust_ids if labels[i] == k) for k in set(labels)}
    left = [got[k] for k in got if got[k] < labels.count(k)]  # labels with rows still in the split
    assert not left or max(left) - min(left) <= 1 and all(got[k] <= max(left) + 1 for k in got), got
    assert [int(t) for t in hold_out_trust(task, n, seed, source).trust.input_ids] == trust_ids


@pytest.mark.parametrize(("source", "what"), [("train", "training examples"), ("eval", "held-out examples")])
def test_the_servers_examples_cannot_take_every_row_of_their_split(source, what):
    with pytest.raises(ConfigError, match=rf"robust.trust_examples.*4 would leave none of the 4 {what}"):
        hold_out_trust(_task([0, 1, 0, 1]), 4, 0, source)


@pytest.mark.parametrize("source", ["eval", "train"])
def test_a_run_takes_the_servers_examples_from_the_split_trust_data_names(tmp_path, shared_data, source):
    """Through load_task, as the server and every client call it: with robust.trust_data = 'eval'
    the training split (so every client's partition) is the run's without trust examples and the
    server evaluates on the rest of its held-out split; with 'train' the held-out split is whole."""
    from fedlora.data import load_task

    plain = load_task(make_config(tmp_path / "plain"))
    task = load_task(make_config(tmp_path / source, robust={"trust_examples": 32, "trust_data": source}))
    ids = lambda ex: sorted(tuple(t.tolist()) for t in ex.input_ids)  # noqa: E731
    assert len(task.trust) == 32
    cut, whole = ("test", "train") if source == "eval" else ("train", "test")
    assert ids(getattr(task, whole)) == ids(getattr(plain, whole))
    assert sorted(ids(getattr(task, cut)) + ids(task.trust)) == ids(getattr(plain, cut))
    assert task.train_labels == task.train.labels.tolist()


# ---------------------------------------------------------------------------------- the score
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), length=st.integers(1, 30), a=st.floats(1e-3, 1e3), b=st.floats(1e-3, 1e3))
def test_trust_is_the_positive_part_of_the_cosine_whatever_the_scales(seed, length, a, b):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(length, generator=g).double(), torch.randn(length, generator=g).double()
    cos = float(torch.nn.functional.cosine_similarity(x, y, dim=0))
    assert trust_score(x, y) == pytest.approx(max(0.0, cos), abs=1e-9)
    assert trust_score(a * x, b * y) == pytest.approx(trust_score(x, y), abs=1e-9)
    assert trust_score(-x, y) == pytest.approx(max(0.0, -cos), abs=1e-9)
    assert trust_score(x, x) == pytest.approx(1.0) and trust_score(x, torch.zeros(length)) == 0.0
    assert trust_score(torch.zeros(length), y) == 0.0
    unit = x / x.norm()  # a unit vector has a direction like any other
    assert trust_score(unit, y) == pytest.approx(max(0.0, cos), abs=1e-9)


# ---------------------------------------------------------------------------------- the round
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_each_reply_weighs_its_bounded_count_times_its_trust_or_fltrusts_form_in_any_arrival_order(data):
    """Ten clients of 10-1000 examples moving half along the server's own step and half their own; up
    to four sign-flip their change at 3.5x: in any order the flipped ones are left out and named with
    trust 0 and every other reply is named with its trust. By default the new global adapter is the
    start plus sum(w_i t_i u_i) / sum(w_i t_i) over the kept replies (w: the example count, u: the
    change); with robust.trust_action = 'fltrust' it is FLTrust's sum(t_i ||g0|| / ||u_i|| u_i) / sum(t_i),
    whatever the sizes."""
    sizes = data.draw(st.lists(st.integers(10, 1000), min_size=10, max_size=10), label="examples")
    liars = data.draw(st.lists(st.integers(0, 9), max_size=4, unique=True), label="liars")
    order = data.draw(st.permutations(range(10)), label="order")
    rescale = data.draw(st.booleans(), label="fltrust")
    attack = dict.fromkeys(liars, "flip")
    # The trust scores alone: the direction bound (robust.min_cosine) would cut the flips first.
    opts = {"trust_examples": "64", "trust_action": '"fltrust"' if rescale else '"weigh"', "min_cosine": "-1"}
    seen: dict = {}
    ref, ref_rl = _attacked_round(list(range(10)), attack, examples=sizes, seen=seen, **opts)
    s, rl = _attacked_round(list(order), attack, examples=sizes, seen={}, **opts)
    assert sorted(rl.rejected) == sorted(ref_rl.rejected) and rl.figures == ref_rl.figures
    left_out = sorted(x.split(" (node")[0] for x in rl.rejected)
    assert left_out == [f"client c{i}" for i in sorted(liars)], rl.rejected
    assert all(
        x.endswith(
            "trust 0: its update has no positive cosine with the server's update on its 64 examples "
            "(robust.trust_examples); left out of the fold"
        )
        for x in rl.rejected
    ), rl.rejected
    scores = rl.figures["trust-scores"]
    assert set(scores) == {f"c{i}" for i in range(10)}
    assert rl.figures["trust-reference-norm"] == pytest.approx(float(seen["reference"].norm()))
    assert all(scores[f"c{i}"] == 0.0 for i in liars) and all(
        scores[f"c{i}"] > 0.3 for i in range(10) if i not in liars
    )
    kept = [i for i in range(10) if i not in liars]
    reference, changes = seen["reference"], seen["changes"]
    g0 = float(reference.double().norm())
    trust_lines = [x for x in rl.clipped if "(cosine with the server's update" in x]
    assert len(trust_lines) == len(kept), rl.clipped
    bounded = {x.split(":")[0] for x in rl.clipped if x not in trust_lines}  # the robust layer's own lines
    assert bounded <= {f"client c{i}" for i in liars} and (not bounded or not rescale), rl.clipped
    for i in kept:
        t, u = scores[f"c{i}"], changes[f"c{i}"]
        assert t == pytest.approx(float(torch.nn.functional.cosine_similarity(u, reference, dim=0)), abs=1e-5)
        line = next(x for x in trust_lines if x.startswith(f"client c{i}: "))
        if rescale:
            assert line.startswith(f"client c{i}: trust {t:.3g} (cosine with the server's update on its 64 examples")
            assert (
                f"in place of {sizes[i]} examples, update norm {float(u.norm()):.4g} rescaled to the server's {g0:.4g}"
                in line
            )
        else:
            assert line.startswith(f"client c{i}: weight {sizes[i]:.4g} x trust {t:.3g} = {sizes[i] * t:.4g} (cosine")
    t = [scores[f"c{i}"] for i in kept]
    if rescale:
        weights, moved = t, [g0 / float(changes[f"c{i}"].norm()) * changes[f"c{i}"] for i in kept]
    else:
        weights, moved = [sizes[i] * ti for i, ti in zip(kept, t)], [changes[f"c{i}"] for i in kept]
    expected = sum(w * m for w, m in zip(weights, moved)) / sum(weights)
    from fedlora.robust import update_change

    got = update_change(seen["start"], s.start_factors(next(iter(s.profiles.values())), 2))
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-6)
    for (k, a), (_, b) in zip(s.global_eff.tensors(), ref.global_eff.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.parametrize("liars", [[], [2], [0, 5, 9]])
def test_report_only_scores_and_flags_and_leaves_the_round_as_the_defaults_fold_it(liars):
    """robust.trust_action = 'report': the same scores as 'weigh', the flipped clients flagged (not
    left out), and the new global adapter the one the defaults give without trust scores."""
    attack = dict.fromkeys(liars, "flip")
    alone = {"min_cosine": "-1"}  # the scores alone: the direction bound would cut the flips first
    s, rl = _attacked_round(list(range(10)), attack, seen={}, trust_examples="64", trust_action='"report"', **alone)
    _, weighed = _attacked_round(list(range(10)), attack, seen={}, trust_examples="64", **alone)
    plain, plain_rl = _attacked_round(list(range(10)), attack, **alone)
    assert rl.figures["trust-scores"] == weighed.figures["trust-scores"]
    assert not rl.rejected and rl.clipped == plain_rl.clipped  # only the robust layer's own lines
    assert [x.split(":")[0] for x in rl.flagged] == [f"client c{i}" for i in liars], rl.flagged
    assert all("folded as it came (robust.trust_action = 'report')" in x for x in rl.flagged)
    for (k, a), (_, b) in zip(s.global_eff.tensors(), plain.global_eff.tensors()):
        torch.testing.assert_close(a, b, msg=k)


def test_a_server_update_of_norm_0_leaves_the_replies_untouched_and_the_round_says_so():
    """No direction to trust (the server's examples moved nothing): every reply passes as it came,
    and the round log says the replies were weighed untrusted."""
    from fedlora.aggregation.trust import TrustStage
    from fedlora.strategies.round_log import RoundLog

    rl = RoundLog(server_round=3)
    stage = TrustStage(None, rl, None, 64, "weigh")  # the extension passes None for a zero update
    replies = [object(), object()]
    assert [x for r in replies for x in stage.offer(r)] == replies and stage.flush() == []
    stage.end()
    assert rl.flagged == ["robust.trust_examples: no server update this round; replies weighed untrusted"]
    assert not rl.rejected and not rl.clipped and "trust-scores" not in rl.figures


# ---------------------------------------------------------------------------------- the server's update
def _server_run(tmp_path, strategy: str = "fedit", sizes=(10, 100, 1000), **train):
    """The server side of a tiny-BERT run holding 32 trust examples, built as the ServerApp builds it,
    with profiles of the given declared sizes; returns (config, strategy, its trust extension)."""
    from fedlora.data import load_task
    from fedlora.lora_math import to_effective
    from fedlora.protocol import NodeProfile
    from fedlora.registry import extensions_for, get_strategy
    from fedlora.server.global_model import GlobalModel, reference_rank

    cfg = make_config(
        tmp_path,
        robust={"trust_examples": 32},
        federation={"strategy": strategy, "num_clients": 3},
        train={"local_epochs": 1, "batch_size": 16, "learning_rate": 3e-3, **train},
    )
    gm = GlobalModel(cfg, load_task(cfg).label_names, reference_rank(cfg))
    s = get_strategy(strategy)(cfg, gm.template(), extensions=extensions_for(cfg))
    s.global_eff = s.initial_global(to_effective(gm.init))
    for i, n in enumerate(sizes):
        s.profiles[100 + i] = NodeProfile(100 + i, f"c{i}", i, 4, cfg.lora.alpha_for_rank(4), n, 10)
    return cfg, s, next(e for e in s.extensions if e.name == "trust")


def test_the_servers_update_trains_its_examples_for_a_median_clients_steps_once_per_round(tmp_path, caplog):
    """The server trains a median client's steps (one epoch of the median declared size, or
    train.local_steps), from the global adapter, once per round: the stage of a round asked twice
    scores against one update; another round's differs (its own seed); the update covers exactly
    the parts a reply carries, and its norm is the round's figure."""
    import logging
    import re

    from fedlora.robust import update_change
    from fedlora.strategies.round_log import RoundLog

    cfg, s, trust = _server_run(tmp_path, sizes=(10, 100, 1000, 2000, 5000))
    rl = RoundLog(server_round=1)
    caplog.set_level(logging.INFO, logger="fedlora.server")
    first = trust.reply_stage(s, rl).reference
    assert rl.figures["trust-server-steps"] == 63  # ceil(1000 / 16): the median of the five sizes
    said = [r.getMessage() for r in caplog.records if "trust examples" in r.getMessage()]
    assert len(said) == 1 and re.fullmatch(
        r"round 1: the server's update on its 32 trust examples \(63 steps, \d+\.\d s\) has norm "
        + re.escape(f"{float(first.norm()):.4g}"),
        said[0],
    ), said
    assert 0 <= float(said[0].split("steps, ")[1].split(" s)")[0]) < 600
    assert rl.figures["trust-reference-norm"] == pytest.approx(float(first.norm())) and float(first.norm()) > 0
    assert trust.reply_stage(s, rl).reference is first
    prof = s.profiles[100]
    start = s.round_start(prof, 1)
    assert first.numel() == update_change(start, start).numel()
    other = trust.reply_stage(s, RoundLog(server_round=2)).reference
    assert not torch.equal(other, first)
    again = _server_run(tmp_path / "again")[2].reply_stage(s, RoundLog(server_round=1)).reference
    torch.testing.assert_close(again, first)  # deterministic: the same round's seed, the same update
    _, s3, t3 = _server_run(tmp_path / "steps", local_steps=3)
    rl3 = RoundLog(server_round=1)
    t3.reply_stage(s3, rl3)
    assert rl3.figures["trust-server-steps"] == 3
    # The steps are trained, not only reported: two steps (one epoch of its 32 examples) move it elsewhere.
    _, s2, t2 = _server_run(tmp_path / "two", sizes=(10, 20, 30))
    two = t2.reply_stage(s2, RoundLog(server_round=1)).reference
    assert two.shape == first.shape and not torch.allclose(two, first)
    # A server update of norm 0 gives the round no reference to score against.
    rl0 = RoundLog(server_round=5)
    trust.use_reference(torch.zeros_like(first), rl0)
    assert trust.reply_stage(s, rl0).reference is None and rl0.figures["trust-reference-norm"] == 0.0


def test_under_ffa_the_server_trains_b_and_the_head_only(tmp_path):
    """FFA-LoRA: A is frozen at the seed, so the server's update has no A part; it is laid out as an
    FFA reply's (B and the head) and A is unchanged in the model it trained."""
    from fedlora.robust import update_change
    from fedlora.strategies.round_log import RoundLog

    cfg, s, trust = _server_run(tmp_path, strategy="ffa")
    ref = trust.reply_stage(s, RoundLog(server_round=1)).reference
    start = s.round_start(s.profiles[100], 1)
    assert "A" not in start.parts() and ref.numel() == update_change(start, start).numel()
    from fedlora.factors import extract_factors
    from fedlora.model import initial_factors

    model = trust._server.model
    trained, seeded = extract_factors(model), initial_factors(model, cfg.lora.init_seed)
    for name, m in trained.modules.items():
        torch.testing.assert_close(m.A, seeded.modules[name].A, rtol=0, atol=0)


def test_the_extension_applies_from_one_trust_example():
    from fedlora.aggregation.trust import ServerTrust
    from fedlora.config import FedLoraConfig

    assert ServerTrust.applies(FedLoraConfig.load(None, ["robust.trust_examples=1"]))
    assert not ServerTrust.applies(FedLoraConfig.load(None, []))


# ---------------------------------------------------------------------------------- what it refuses
@pytest.mark.parametrize(
    "overrides, why",
    [
        (['federation.strategy="fedsa"'], "fedsa keeps"),
        (['federation.strategy="hetlora"'], "hetlora gives its clients starts of their own"),
        (['federation.strategy="flora"'], "flora gives its clients starts of their own"),
        (["privacy.client_dp=true"], "client-level DP releases the round"),
        (['robust.aggregation="median"'], "robust.aggregation = 'median' ignores weights"),
        (["dylora.enabled=true"], "DyLoRA trains one rank per round"),
    ],
)
def test_runs_whose_clients_do_not_start_from_the_servers_adapter_are_refused(overrides, why):
    from fedlora.config import FedLoraConfig

    with pytest.raises(ConfigError, match=r"invalid config for 'robust.trust_examples': " + why.replace("(", r"\(")):
        FedLoraConfig.load(None, ["robust.trust_examples=32", *overrides])
    FedLoraConfig.load(None, ["robust.trust_examples=32", 'federation.strategy="ffa"'])  # FFA-LoRA: its clients do


def test_an_unknown_trust_action_is_refused_naming_the_values_it_takes():
    from fedlora.config import FedLoraConfig

    with pytest.raises(ConfigError, match=r"robust.trust_action.*must be 'weigh', 'fltrust' or 'report', got 'vote'"):
        FedLoraConfig.load(None, ["robust.trust_examples=32", "robust.trust_action='vote'"])


# ---------------------------------------------------------------------------------- a real federation
@pytest.mark.federation
def test_a_sign_flipped_client_gets_no_trust_in_a_real_simulation_and_the_round_goes_on(tmp_path, shared_data):
    """Four MiniLM clients on an IID AG News split, the server holding 32 examples: every round
    the server trains on them, the client that sends its own change sign-flipped (inside every
    default bound) is left out with trust 0 and named, every honest client is kept with a positive
    score, and the run ends with a finite adapter. (A random tiny BERT learns too little in two rounds
    for any update to point anywhere: the pretrained MiniLM does.)"""
    from fedlora.simulate import simulate

    cfg = make_config(
        tmp_path,
        federation={"num_clients": 4, "min_train_clients": 4},
        robust={"trust_examples": 32, "min_cosine": -1},  # the scores alone: the direction bound would cut it first
        model={"name": "builtin:all-MiniLM-L6-v2", "max_length": 32},
        run={"rounds": 2, "name": "trust"},
    )
    run_dir = simulate(cfg, client_app=fleet.hostile_app({3: "flip"}), engine="inprocess")
    rows = [r for r in run_dir.read_metrics() if r["round"] >= 1]
    assert len(rows) == 2
    from fedlora.partitions import client_data

    sizes = sorted(len(client_data(cfg, i).train) for i in range(4))
    steps = math.ceil(sizes[2] / cfg.train.batch_size)  # one epoch over the median declared size
    for r in rows:
        assert r["trust-reference-norm"] > 0 and r["trust-server-steps"] == steps, r
        scores = r["trust-scores"]
        assert scores["client-00003"] == 0.0 and all(scores[f"client-0000{i}"] > 0 for i in range(3)), scores
        assert [x.split(" (node")[0] for x in r["rejected"]] == ["client client-00003"], r["rejected"]
        assert r["clients-accepted"] == 3 and math.isfinite(r["server-loss"])

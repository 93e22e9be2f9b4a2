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
    ex = Examples([torch.tensor([i]) for i in range(len(labels))], torch.tensor(labels), task="classification")
    return TaskData(
        train=ex, test=ex.subset([0]), label_names=[str(k) for k in range(max(labels) + 1)], train_labels=labels
    )


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=2, max_size=80), share=st.floats(0.01, 0.99), seed=st.integers(0, 99)
)
def test_the_servers_examples_are_out_of_train_balanced_and_fixed_by_the_seed(labels, share, seed):
    """Every training row is either the server's or still train (never both, none lost), in train's
    order; each label gives min(its rows, its turn) examples, so the counts of the labels not used up
    differ by at most one; the same seed picks the same rows."""
    n = max(1, min(len(labels) - 1, round(share * len(labels))))
    task = _task(labels)
    out = hold_out_trust(task, n, seed)
    trust_ids = [int(t) for t in out.trust.input_ids]
    train_ids = [int(t) for t in out.train.input_ids]
    assert len(trust_ids) == n and sorted(trust_ids + train_ids) == list(range(len(labels)))
    assert train_ids == sorted(train_ids) and out.train_labels == [labels[i] for i in train_ids]
    assert out.trust.labels.tolist() == [labels[i] for i in trust_ids]
    got = {k: sum(1 for i in trust_ids if labels[i] == k) for k in set(labels)}
    left = [got[k] for k in got if got[k] < labels.count(k)]  # labels with rows still in train
    assert not left or max(left) - min(left) <= 1 and all(got[k] <= max(left) + 1 for k in got), got
    assert [int(t) for t in hold_out_trust(task, n, seed).trust.input_ids] == trust_ids


def test_the_servers_examples_cannot_take_every_training_row():
    with pytest.raises(ConfigError, match=r"robust.trust_examples.*4 would leave none of the 4"):
        hold_out_trust(_task([0, 1, 0, 1]), 4, 0)


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
    opts = {"trust_examples": "64", "trust_action": '"fltrust"' if rescale else '"weigh"'}
    seen: dict = {}
    ref, ref_rl = _attacked_round(list(range(10)), attack, examples=sizes, seen=seen, **opts)
    s, rl = _attacked_round(list(order), attack, examples=sizes, seen={}, **opts)
    assert sorted(rl.rejected) == sorted(ref_rl.rejected) and rl.figures == ref_rl.figures
    left_out = sorted(x.split(" (node")[0] for x in rl.rejected)
    assert left_out == [f"client c{i}" for i in sorted(liars)], rl.rejected
    assert all("trust 0: its update has no positive cosine with the server's update" in x for x in rl.rejected)
    scores = rl.figures["trust-scores"]
    assert set(scores) == {f"c{i}" for i in range(10)}
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
    s, rl = _attacked_round(list(range(10)), attack, seen={}, trust_examples="64", trust_action='"report"')
    _, weighed = _attacked_round(list(range(10)), attack, seen={}, trust_examples="64")
    plain, plain_rl = _attacked_round(list(range(10)), attack)
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
    stage = TrustStage(None, rl, None, 64)  # the extension passes None for a zero update
    replies = [object(), object()]
    assert [x for r in replies for x in stage.offer(r)] == replies and stage.flush() == []
    stage.end()
    assert rl.flagged == ["robust.trust_examples: no server update this round; replies weighed untrusted"]
    assert not rl.rejected and not rl.clipped and "trust-scores" not in rl.figures


# ---------------------------------------------------------------------------------- what it refuses
@pytest.mark.parametrize(
    "overrides, why",
    [
        (['federation.strategy="fedsa"'], "fedsa keeps"),
        (['federation.strategy="hetlora"'], "hetlora gives its clients starts of their own"),
        (['federation.strategy="flora"'], "flora gives its clients starts of their own"),
        (["privacy.client_dp=true"], "client-level DP releases the round"),
        (['robust.aggregation="median"'], "robust.aggregation = 'median' ignores weights"),
        (["robust.trust_action='vote'"], None),
        (["dylora.enabled=true"], "DyLoRA trains one rank per round"),
    ],
)
def test_runs_whose_clients_do_not_start_from_the_servers_adapter_are_refused(overrides, why):
    from fedlora.config import FedLoraConfig

    if why is None:  # the action itself: named with the values it takes
        with pytest.raises(
            ConfigError, match=r"robust.trust_action.*must be 'weigh', 'fltrust' or 'report', got 'vote'"
        ):
            FedLoraConfig.load(None, ["robust.trust_examples=32", *overrides])
        return
    with pytest.raises(ConfigError, match=r"invalid config for 'robust.trust_examples': " + why.replace("(", r"\(")):
        FedLoraConfig.load(None, ["robust.trust_examples=32", *overrides])
    FedLoraConfig.load(None, ["robust.trust_examples=32", 'federation.strategy="ffa"'])  # FFA-LoRA: its clients do


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
        robust={"trust_examples": 32},
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

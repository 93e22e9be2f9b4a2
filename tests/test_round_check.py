"""The round check (robust.round_check): the maths of its verdict, and real simulations in which a round
the honest clients score worse is rolled back whoever lies about the scores, an honest round is kept
whoever lies, and a malformed score is named and left out."""

from __future__ import annotations

import math

import cloudpickle
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fleet
from conftest import make_config
from fedlora.aggregation.round_check import RoundCheck, median_change, relative_change
from fedlora.clients.session import check_examples
from fedlora.rundir import round_line
from fedlora.simulate import simulate

cloudpickle.register_pickle_by_value(fleet)

loss = st.floats(0.0, 50.0, allow_nan=False)


def test_relative_change_is_the_rise_over_the_start():
    assert relative_change(2.0, 1.0) == -0.5
    assert relative_change(1.0, 1.25) == 0.25
    assert relative_change(0.0, 0.0) == 0.0
    assert relative_change(0.0, 0.1) == math.inf
    assert median_change([(1.0, 2.0), (1.0, 0.5), (2.0, 1.0)]) == -0.5
    assert median_change([(1.0, 2.0), (1.0, 0.5)]) == pytest.approx(0.25)  # an even count: the middle two's mean


@settings(deadline=None, max_examples=300)
@given(
    honest=st.lists(st.tuples(st.floats(0.01, 50.0), loss), min_size=1, max_size=15),
    liars=st.lists(st.tuples(loss, loss), max_size=14),
    data=st.data(),
)
def test_fewer_than_half_liars_keep_the_median_inside_the_honest_clients_changes(honest, liars, data):
    """Whatever fewer than half the clients report, in whatever order, the verdict's median lies
    between the smallest and the largest honest change: liars cannot roll back a round every honest
    client scored better, nor keep one every honest client scored worse."""
    liars = liars[: len(honest) - 1]  # fewer liars than honest clients: fewer than half of all
    pairs = data.draw(st.permutations(honest + liars))
    got = median_change(pairs)
    changes = [relative_change(b, a) for b, a in honest]
    assert min(changes) - 1e-12 <= got <= max(changes) + 1e-12


def test_the_check_is_opt_in_and_off_under_differential_privacy(tmp_path):
    assert not RoundCheck.applies(make_config(tmp_path))
    assert RoundCheck.applies(make_config(tmp_path, robust={"round_check": True}))
    dp = {"client_dp": True, "client_clip": 1.0, "client_noise_multiplier": 1.0}
    assert not RoundCheck.applies(make_config(tmp_path, robust={"round_check": True}, privacy=dp))


def _cfg(tmp_path, clients=5, **robust):
    robust.setdefault("round_check", True)
    return make_config(
        tmp_path,
        run={"rounds": 2, "seed": 7},
        federation={
            "num_clients": clients,
            "min_train_clients": clients,
            "min_evaluate_clients": clients,
            "evaluate_every": 2,
        },
        robust=robust,
    )


def _run(cfg, bad):
    run_dir = simulate(cfg, client_app=fleet.hostile_app(bad), engine="inprocess")
    return run_dir, run_dir.read_metrics()


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir.path / "adapter" / "adapter_model.safetensors"))


# Every per-update bound off (the check alone stands against the boosters); a 5% tolerance, since the
# random tiny BERT barely moves its loss in a round (an honest aggregate changes the median client's
# loss by about 0.1%, a boosted one by 1e4x).
OFF = {"relative_norm_bound": 0, "max_weight_factor": 0, "weight_from_norm": False, "round_check_tolerance": 0.05}


def test_a_round_one_update_wrecks_is_rolled_back_even_when_its_sender_praises_it(tmp_path, shared_data):
    """Every per-update bound off, one client of six boosts its change x1e6 and scores every aggregate
    perfect, another scores it NaN: the four honest clients' scores roll every round back (the NaN
    score is dropped and named), the final model is the initial one, and the console line says so."""
    run_dir, rows = _run(_cfg(tmp_path, clients=6, **OFF), {2: {"boost", "check-praise"}, 5: "check-nan"})
    trained = [r for r in rows if r["round"] >= 1]
    assert [r["round"] for r in trained] == [1, 2]
    for r in trained:
        assert r["round-check-clients"] == 5
        assert r["round-check-median-change"] > 1.0  # the honest clients' loss more than doubled
        assert "rolled back" in r["rolled-back"] and "round_check_tolerance" in r["rolled-back"]
        assert "rolled back" in round_line(r)
        assert any("client-00005" in x and "'check-loss'=nan" in x for x in r["rejected-evaluate"])
    assert trained[-1]["server-loss"] == pytest.approx(rows[0]["server-loss"], rel=1e-6)  # the initial model


def test_two_of_five_cannot_keep_a_round_they_wreck_and_without_the_check_the_model_is_wrecked(tmp_path, shared_data):
    """Two boosters of five that both praise the aggregate (fewer than half): every round is rolled
    back, and the same run without the check ends with an adapter orders of magnitude larger."""
    bad = {1: {"boost", "check-praise"}, 3: {"boost", "check-praise"}}
    run_dir, rows = _run(_cfg(tmp_path / "checked", **OFF), bad)
    trained = [r for r in rows if r["round"] >= 1]
    assert all(r.get("rolled-back") for r in trained)
    assert trained[-1]["server-loss"] == pytest.approx(rows[0]["server-loss"], rel=1e-6)

    wrecked_dir, wrecked = _run(_cfg(tmp_path / "unchecked", round_check=False, **OFF), bad)
    assert not any(r.get("rolled-back") for r in wrecked)
    assert max(float(t.abs().max()) for t in _adapter(wrecked_dir).values()) > 100 * max(
        float(t.abs().max()) for t in _adapter(run_dir).values()
    )


def test_an_honest_round_is_kept_when_two_of_six_blame_it_and_a_malformed_score_is_named(tmp_path, shared_data):
    """Honest training; two clients score every aggregate 1e6 (two of the five valid scores: the median
    is honest) and a third sends a NaN score (its evaluate reply is dropped and named, the round goes on)."""
    bad = {0: "check-blame", 3: "check-blame", 4: "check-nan"}
    honest_dir, honest = _run(_cfg(tmp_path / "honest", clients=6), {})
    run_dir, rows = _run(_cfg(tmp_path / "blamed", clients=6), bad)
    for r in [r for r in rows if r["round"] >= 1]:
        assert not r.get("rolled-back"), r.get("rolled-back")
        assert r["round-check-clients"] == 5  # the NaN score is left out
        assert r["round-check-median-change"] < 0
        assert any("client-00004" in x and "'check-loss'=nan" in x for x in r["rejected-evaluate"])
    # The liars' updates are honest: the run learns exactly what the honest run learns.
    a, b = _adapter(honest_dir), _adapter(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in honest if r["round"] >= 1][-1]["round-check-median-change"] < 0


def test_check_examples_are_the_validation_part_else_the_first_of_the_training_data():
    from fedlora.data import Examples
    from fedlora.partitions import ClientData

    train = Examples([torch.tensor([i], dtype=torch.int32) for i in range(24)], torch.arange(24) % 3)
    got = check_examples(ClientData(train=train, test=train.subset([0])), 8)
    assert [int(t[0]) for t in got.input_ids] == list(range(8))
    assert len(check_examples(ClientData(train=train, test=train.subset([0])), 100)) == 24
    val = train.subset([1, 2])
    assert check_examples(ClientData(train=train, test=train.subset([0]), val=val), 8) is val

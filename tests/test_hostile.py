"""Hostile clients against real Flower simulations with honest clients present: every run
finishes every round, the bad client is named with its reason in metrics.jsonl, and the final
global adapter is finite and matches (or, for finite poisoning under a defence, stays within
tolerance of) an honest-only run of the same federation."""

from __future__ import annotations

import logging

import cloudpickle
import pytest
import torch

import fleet
from conftest import make_config
from fedlora.simulate import simulate

cloudpickle.register_pickle_by_value(fleet)


def _run(cfg, bad, engine: str = "inprocess"):
    """The run with the misbehaving clients ``bad`` (partition -> kind). What these tests check is the
    server's validation and bounds, the same on any engine: the in-process grid by default; the real
    engine where timeouts and crashed processes are the point."""
    run_dir = simulate(cfg, client_app=fleet.hostile_app(bad), engine=engine)
    return run_dir, run_dir.read_metrics()


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir.path / "adapter" / "adapter_model.safetensors"))


def _delta(ad: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every module's B @ A (the update the adapter makes), concatenated."""
    out = []
    for k, a in sorted(ad.items()):
        if k.endswith("lora_A.weight"):
            out.append((ad[k.replace("lora_A", "lora_B")].double() @ a.double()).flatten())
    return torch.cat(out)


def _all_finite(ad) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ad.values())


def _text(rows, key="rejected") -> str:
    return " | ".join(x for r in rows for x in (r.get(key) or []))


def test_malformed_replies_are_dropped_and_the_result_equals_the_honest_only_run(tmp_path, shared_data):
    cfg = make_config(tmp_path, federation={"num_clients": 8, "min_train_clients": 8, "min_evaluate_clients": 8})
    bad = {
        1: "drop-b",
        2: "drop-bias",
        3: "rank-nan",
        4: "examples-frac",
        5: "base-key",
        6: {"rank-frac", "eval-out-of-range"},
        7: "eval-no-accuracy",
    }
    run_dir, rows = _run(cfg, bad)
    assert [r["round"] for r in rows] == [0, 1, 2]
    text = _text(rows)
    for part, reason in [
        (1, "missing ['"),
        (2, "missing ['head/classifier.bias']"),
        (3, "'rank'=nan"),
        (4, "'num-examples'=2.5 is not an integer"),
        (5, "unexpected ['base/"),
        (6, "'rank'=4.7 is not an integer"),
    ]:
        assert f"client client-0000{part}" in text and reason in text, (part, reason, text)
    ev = _text(rows, "rejected-evaluate")
    assert "client-00006" in ev and "'loss'=nan is not a finite number" in ev
    assert "client-00007" in ev and "no 'accuracy'" in ev
    assert all(r["clients-accepted"] == 2 for r in rows[1:])  # partitions 0 and 7 train honestly
    assert 0.0 <= rows[-1]["personal-accuracy-mean"] <= 1.0

    # Honest-only: the same federation where the bad clients' replies never arrive (they crash).
    ref_dir, _ = _run(
        make_config(tmp_path / "ref", federation={"num_clients": 8, "min_train_clients": 8, "min_evaluate_clients": 8}),
        {p: "crash" for p in range(1, 7)},
    )
    got, ref = _adapter(run_dir), _adapter(ref_dir)
    assert _all_finite(got)
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-6), k


def test_lying_profiles_drop_the_node_not_the_run(tmp_path, shared_data):
    cfg = make_config(
        tmp_path,
        federation={"num_clients": 7, "min_train_clients": 7, "min_evaluate_clients": 7, "max_declared_examples": 1000},
        robust={"max_client_share": 0.4},
    )
    bad = {
        1: "profile-rank-double",
        2: "profile-rank-string",
        3: "profile-dup-id",
        4: {"profile-size-1e12", "examples-cap"},
        5: "profile-alpha-nan",
        6: "profile-alpha-big",
    }
    run_dir, rows = _run(cfg, bad)
    assert [r["round"] for r in rows] == [0, 1, 2]
    text = _text(rows)
    assert "rank 8 contradicts the run: fedit trains every client at rank 4" in text
    assert "rank='4' is not a number" in text
    flagged = _text(rows, "flagged")
    # Partition 3 declares partition 0's id: the simulation binds each node to its partition's id,
    # so it is named and trains as itself, and client-00000 is never locked out.
    assert (
        "declares client id 'client-00000'; the simulation engine gave it the partition whose client id is "
        "'client-00003', which is its client id" in flagged
    )
    assert "client-00004" in flagged and "capped at federation.max_declared_examples (1000)" in flagged
    assert "client-00005" in flagged and "declared alpha nan ignored" in flagged
    assert "client-00006" in flagged and "declared alpha 1000000.0 ignored" in flagged
    # 0, 3, 4, 5, 6 train (4's claimed 1000 examples are capped to 40% of the weight), and 2 of 7 are out
    assert all(r["clients-accepted"] == 5 for r in rows[1:]), [r["clients-accepted"] for r in rows]
    assert {c["client-id"] for c in rows[-1]["clients"]} >= {"client-00000", "client-00003"}
    assert _all_finite(_adapter(run_dir))


def test_hetlora_rank_zero_profile_and_infinite_rank_metric(tmp_path, shared_data):
    cfg = make_config(
        tmp_path,
        federation={"strategy": "hetlora", "num_clients": 4, "min_train_clients": 4},
        hetero={"client_ranks": [2, 4, 4, 2]},
    )
    run_dir, rows = _run(cfg, {1: "profile-rank-zero", 2: "rank-inf"})
    text = _text(rows)
    assert "rank=0 is not in 1.." in text and "'rank'=inf" in text and "client-00002" in text
    assert all(r["clients-accepted"] == 2 for r in rows[1:])
    assert _all_finite(_adapter(run_dir))


FOUR = {"federation": {"num_clients": 4, "min_train_clients": 4}, "run": {"rounds": 2}}


@pytest.fixture(scope="module")
def honest_only(tmp_path_factory, shared_data):
    """Four clients with the defaults, where client 3's reply never arrives (it crashes): the honest
    run every attack on client 3 below is measured against (no honest client is bounded in it)."""
    run_dir, rows = _run(make_config(tmp_path_factory.mktemp("honest"), **FOUR), {3: "crash"})
    assert not _text(rows, "clipped"), rows
    return run_dir


def test_finite_poisoning_is_bounded_by_the_norm_clip_and_the_median(tmp_path, honest_only):
    def cfg(sub, **robust):
        return make_config(tmp_path / sub, robust=robust, **FOUR)

    def distance(run_dir, ref_dir) -> float:
        ref = _delta(_adapter(ref_dir))
        return float((_delta(_adapter(run_dir)) - ref).norm() / ref.norm())

    # Each defence against the honest-only run.
    clip_ref = honest_only
    clip_dir, clip_rows = _run(cfg("clip", update_norm_bound=1.0), {3: "scale-1e6"})
    raw_dir, raw_rows = _run(cfg("raw", relative_norm_bound=0.0, min_cosine=-1), {3: "scale-1e6"})  # every bound off
    assert distance(raw_dir, clip_ref) > 100  # undefended, one client wrecks the adapter
    assert distance(clip_dir, clip_ref) < 0.5
    assert "client-00003: update norm" in _text(clip_rows, "clipped")
    assert clip_rows[-1]["server-loss"] < 2.0 < raw_rows[-1]["server-loss"]
    # The coordinate median alone (the default relative and direction bounds off, as in the undefended run) keeps the
    # same x1e6 client inside the honest clients' range: the median of 4 is the mean of the two middle
    # values, not the honest-only run's, but of its size (the mean's is 10^6 times) and the model learns.
    med_dir, med_rows = _run(
        cfg("median", aggregation="median", relative_norm_bound=0.0, min_cosine=-1), {3: "scale-1e6"}
    )
    assert _all_finite(_adapter(med_dir)) and distance(med_dir, clip_ref) < 3
    assert med_rows[-1]["server-loss"] < 2.0


def test_with_defaults_one_outsized_client_is_left_out_and_named(tmp_path, honest_only, caplog):
    """The default relative bounds: one client sending x1e6 its factors, or its start plus 1e6 times
    its own change, among three honest ones, is far beyond robust.relative_norm_reject (10x the
    round's median) and left out: the global adapter is the honest-only run's (that client's reply
    never arriving), and the client is named in the round's row and on the console, no honest one."""
    ref = _delta(_adapter(honest_only))
    caplog.set_level(logging.WARNING, logger="fedlora.server")
    for attack in ("scale-1e6", "boost"):
        caplog.clear()
        run_dir, rows = _run(make_config(tmp_path / attack, **FOUR), {3: attack})
        assert float((_delta(_adapter(run_dir)) - ref).norm() / ref.norm()) < 1e-5, attack
        named = _text(rows, "rejected")
        assert all(
            "client-00003 (node" in x and "robust.relative_norm_reject (10x)" in x
            for r in rows[1:]
            for x in r["rejected"]
        )
        assert all(len(r["rejected"]) == 1 and r["clients-accepted"] == 3 for r in rows[1:]), named
        assert not _text(rows, "clipped") and not _text(rows, "flagged"), rows  # no honest client was bounded
        console = [
            r.getMessage() for r in caplog.records if "rejected reply from client client-00003" in r.getMessage()
        ]
        assert len(console) == len(rows) - 1, console  # each named on the console too


def test_with_the_reject_bound_off_one_outsized_client_moves_the_global_little_and_is_named(
    tmp_path, honest_only, caplog
):
    """robust.relative_norm_reject = 0: the boosted client (start + 1e6 x its own change) is clipped
    onto 1.5x the round's median change for its size instead, in its own direction, so an aligned
    round moves up to (3 + 1.5) / 4 of an honest one's mean and the rounds compound: the global
    adapter's norm stays within 2x the honest-only run's and its change within 2.5x; named."""
    ref = _adapter(honest_only)
    ref_norm = float(torch.cat([t.flatten().double() for _, t in sorted(ref.items())]).norm())
    caplog.set_level(logging.WARNING, logger="fedlora.server")
    run_dir, rows = _run(make_config(tmp_path, robust={"relative_norm_reject": 0.0}, **FOUR), {3: "boost"})
    ad = _adapter(run_dir)
    assert _all_finite(ad)
    norm = float(torch.cat([t.flatten().double() for _, t in sorted(ad.items())]).norm())
    assert norm < 2 * ref_norm, (norm, ref_norm)
    assert float(_delta(ad).norm()) < 2.5 * float(_delta(ref).norm())
    named = _text(rows, "clipped")
    assert "client-00003: update norm" in named and "robust.relative_norm_bound" in named, named
    assert "client-0000" not in named.replace("client-00003", ""), named  # no honest client was bounded
    console = [r.getMessage() for r in caplog.records if "client-00003: update norm" in r.getMessage()]
    assert len(console) == len([x for r in rows for x in r.get("clipped") or []]), console


def test_a_client_whose_effective_factors_overflow_is_named_and_the_round_goes_on(tmp_path, shared_data):
    # Every value 3e38: finite in float32, but B times its scaling (alpha/r = 2) is not. It used to turn
    # every round's aggregate into Inf ("aggregation failed", the global never moved, nobody named).
    cfg = make_config(tmp_path, federation={"num_clients": 3, "min_train_clients": 3}, run={"rounds": 2})
    run_dir, rows = _run(cfg, {2: "near-max"})
    for r in rows[1:]:
        assert not r["aggregation-error"] and r["clients-accepted"] == 2
        assert any("client-00002" in x and "effective factors are not finite" in x for x in r["rejected"])
    ad = _adapter(run_dir)
    assert _all_finite(ad)
    assert float(_delta(ad).abs().max()) > 0.0  # the honest clients' rounds were applied


def test_crashes_and_stragglers_are_named_and_too_few_replies_skip_the_round(tmp_path, shared_data, ray_cluster):
    cfg = make_config(
        tmp_path,
        federation={
            "num_clients": 3,
            "min_train_clients": 3,
            "min_evaluate_clients": 3,
            "round_timeout": 45,
            "min_accepted": 2,
            "evaluate_every": 5,
        },
    )
    # Partition 1 also declares partition 0's id: Flower's engine gives its nodes random ids, and the
    # run binds each to its partition's client id all the same, so it is named (and crashes) as itself.
    run_dir, rows = _run(cfg, {1: {"crash", "profile-dup-id"}, 2: "slow"}, engine="ray")
    r1, r2 = rows[1], rows[2]
    flagged = [x for r in rows for x in r.get("flagged") or []]
    assert any("declares client id 'client-00000'" in x and "'client-00001'" in x for x in flagged), flagged
    line = next(x for x in r1["rejected"] if "client-00001" in x)
    assert line.endswith("failed: ValueError: disk on fire") or "disk on fire" in line
    assert "\n" not in line and len(line) < 300
    assert r1["clients-accepted"] == 2 and not r1["skipped"]
    assert any("client-00002" in x and "no reply within federation.round_timeout (45 s)" in x for x in r2["rejected"])
    assert r2["clients-accepted"] == 1 and "fewer than federation.min_accepted (2)" in r2["skipped"]
    assert _all_finite(_adapter(run_dir))

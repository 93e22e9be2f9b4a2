"""The run directory's records: metrics as JSON lines and, with run.tensorboard, as TensorBoard scalars."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.rundir import RunDir, scalars


def test_scalars_are_a_rows_finite_numbers_grouped_by_their_first_word():
    row = {
        "round": 3,
        "server-accuracy": 0.5,
        "bytes-up-total": 10,
        "seconds": 1.5,
        "skipped": True,
        "server-loss": math.nan,
        "clients": [{"accuracy": 1.0}],
        "strategy": "fedit",
        "flagged": None,
    }
    assert scalars(row) == {"server/accuracy": 0.5, "bytes/up-total": 10.0, "seconds": 1.5}


def test_tensorboard_event_files_hold_each_appended_row(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = RunDir(tmp_path / "run")
    run.append_metrics({"round": 0, "server-accuracy": 0.25})  # before it is enabled: JSON only
    run.enable_tensorboard()
    for r, acc in ((1, 0.5), (2, 0.75)):
        run.append_metrics({"round": r, "server-accuracy": acc, "dp-epsilon": 0.1 * r})
    assert [row["round"] for row in run.read_metrics()] == [0, 1, 2]
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("server/accuracy")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in board.Scalars("dp/epsilon")] == [
        (1, pytest.approx(0.1)),
        (2, pytest.approx(0.2)),
    ]


def test_plot_has_integer_round_ticks_and_baselines(tmp_path):
    from fedlora.rundir import RunDir
    from fedlora.server.evaluation import accuracy_baselines

    rd = RunDir(tmp_path)
    for r in range(3):
        rd.append_metrics({"round": r, "server-accuracy": 0.3 + 0.1 * r, "bytes-up-total": 10})
    base = accuracy_baselines(torch.tensor([0, 0, 0, 1, 2, 3]), 4)
    assert base == {"chance": 0.25, "majority class": 0.5}
    import matplotlib.pyplot as plt

    seen = {}
    orig = plt.Figure.savefig

    def spy(fig, *a, **k):
        ax = fig.axes[0]
        seen["ticks"] = [t for t in ax.get_xticks() if 0 <= t <= 2]
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        rd.plot(base)
    finally:
        plt.Figure.savefig = orig
    assert all(float(t).is_integer() for t in seen["ticks"])
    assert any("chance" in t for t in seen["labels"]) and any("majority" in t for t in seen["labels"])


def test_strategy_state_round_trips_through_an_atomic_checkpoint(tmp_path):
    from test_strategy_maths import _setup

    from fedlora.rundir import RunDir

    cfg, s, profiles, template = _setup(
        "hetlora", "fixed", [2, 4, 8], **{"privacy.client_dp": "true", "privacy.noise_seed": 1}
    )
    s.refused[999] = "lied"
    from fedlora.strategies.base import RoundLog

    s.rounds[1] = RoundLog(server_round=1)
    rd = RunDir(tmp_path)
    rd.write_checkpoint(*s.state_dict())
    tensors, state = rd.read_checkpoint()
    _, again, _, _ = _setup("hetlora", "fixed", [2, 4, 8], **{"privacy.client_dp": "true"})
    again.load_state_dict(tensors, state)
    assert {k: v.to_record() for k, v in again.profiles.items()} == {k: v.to_record() for k, v in s.profiles.items()}
    assert again.refused == {999: "lied"} and state["last-round"] == 1
    for (k1, a), (k2, b) in zip(again.global_eff.tensors(), s.global_eff.tensors()):
        assert k1 == k2 and torch.equal(a, b)
    # a torn checkpoint (tensors replaced after the state was written) is detected, not loaded
    (tmp_path / "checkpoint" / "global.safetensors").write_bytes(b"torn")
    with pytest.raises(ValueError, match="torn"):
        rd.read_checkpoint()


def test_the_console_line_counts_every_bounded_reply_and_the_dp_clips_cuts():
    """A round's console line says how many replies a robust bound cut (the recorder names each on
    its own line) and, under client-level DP, how many were over the clip and how many far beyond."""
    from fedlora.rundir import round_line

    row = {"round": 2, "server-accuracy": 0.5, "seconds": 1.0, "clipped": ["client a: ...", "client b: ..."]}
    assert "2 bounded" in round_line(row)
    assert "bounded" not in round_line({**row, "clipped": []})
    dp = {"round": 2, "seconds": 1.0, "clients-clipped": 3, "clients-far-beyond-clip": 1}
    assert "3 over the DP clip (1 far beyond)" in round_line(dp)
    assert round_line({**dp, "clients-far-beyond-clip": 0}).count("3 over the DP clip |") == 1

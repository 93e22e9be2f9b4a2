"""The run directory's records: metrics as JSON lines and, with run.tensorboard, as TensorBoard scalars."""

from __future__ import annotations

import math

import pytest

from fedlora.rundir import RunDir, scalars


def test_scalars_are_a_rows_finite_numbers_grouped_by_their_first_word():
    row = {"round": 3, "server-accuracy": 0.5, "bytes-up-total": 10, "seconds": 1.5, "skipped": True,
           "server-loss": math.nan, "clients": [{"accuracy": 1.0}], "strategy": "fedit", "flagged": None}
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
    assert [(e.step, e.value) for e in board.Scalars("dp/epsilon")] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]

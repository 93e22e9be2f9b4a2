"""`fedlora compare` grids: every point runs, the choice is made on validation, never on test."""

from __future__ import annotations

import pytest

from fedlora.compare import choose, compare, grid_points, load_comparison, selection_score
from fedlora.config import ConfigError


def test_grid_points_form_the_product_of_their_keys():
    arm = {"name": "a", "grid": {"train.learning_rate": [1e-3, 1e-2], "lora.rank": [4, 8]}}
    pts = grid_points(arm)
    assert len(pts) == 4 and ["lora.rank=4", "train.learning_rate=0.001"] in pts
    assert grid_points({"name": "b"}) == [[]]


def test_choice_follows_the_validation_score_not_the_test_score():
    results = [
        {"arm": "x", "split": "s", "grid-point": ["lr=1"], "selection-score": 0.60, "test": 0.90},
        {"arm": "x", "split": "s", "grid-point": ["lr=2"], "selection-score": 0.70, "test": 0.50},
        {"arm": "y", "split": "s", "grid-point": ["lr=1"], "selection-score": float("-inf"), "test": 0.1},
    ]
    chosen = {r["arm"]: r for r in choose(results)}
    assert chosen["x"]["grid-point"] == ["lr=2"]  # best on validation, although worse on test
    assert [c["selection-score"] for c in chosen["x"]["candidates"]] == [0.60, 0.70]
    rows = [{"round": 1, "personal-val-accuracy-mean": 0.4}, {"round": 2, "personal-val-accuracy-mean": 0.5},
            {"round": 3}]
    assert selection_score(rows, "personal-val-accuracy-mean") == 0.5
    assert selection_score(rows, "server-val-accuracy") == float("-inf")


def test_a_grid_without_a_validation_split_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[base.run]\nrounds = 1\n[[arm]]\nname = "a"\nset = []\ngrid = {"train.learning_rate" = [1e-3, 1e-2]}\n')
    with pytest.raises(ConfigError, match="chosen on validation splits: set data.validation_fraction"):
        compare(f, tmp_path / "out")
    f.write_text('[[arm]]\nname = "a"\ngrid = {"train.learning_rate" = 3}\n')
    with pytest.raises(ConfigError, match="grid must map keys to non-empty lists"):
        load_comparison(f)


def test_curves_show_server_accuracy_when_no_client_evaluated(tmp_path):
    import warnings

    from fedlora.compare import curve_metric, plot

    server_only = [{"arm": a, "split": "s", "rounds": [{"round": 0, "server-accuracy": 0.25},
                                                       {"round": 1, "bytes-up-total": 10},
                                                       {"round": 2, "server-accuracy": 0.8}]} for a in ("x", "y")]
    assert curve_metric(server_only)[0] == "server-accuracy"
    personal = [{"arm": "x", "split": "s", "rounds": [{"round": 1, "server-accuracy": 0.5, "personal-accuracy-mean": 0.7}]}]
    assert curve_metric(personal)[0] == "personal-accuracy-mean"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has no lines: the old, empty plot
        plot(server_only, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0

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
    rows = [
        {"round": 1, "personal-val-accuracy-mean": 0.4},
        {"round": 2, "personal-val-accuracy-mean": 0.5},
        {"round": 3},
    ]
    assert selection_score(rows, "personal-val-accuracy-mean") == 0.5
    assert selection_score(rows, "server-val-accuracy") == float("-inf")


def test_a_grid_without_a_validation_split_is_refused(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[base.run]\nrounds = 1\n[[arm]]\nname = "a"\nset = []\ngrid = {"train.learning_rate" = [1e-3, 1e-2]}\n'
    )
    with pytest.raises(ConfigError, match="chosen on validation splits: set data.validation_fraction"):
        compare(f, tmp_path / "out")
    f.write_text('[[arm]]\nname = "a"\ngrid = {"train.learning_rate" = 3}\n')
    with pytest.raises(ConfigError, match="grid must map keys to non-empty lists"):
        load_comparison(f)


def test_curves_show_server_accuracy_when_no_client_evaluated(tmp_path):
    import warnings

    from fedlora.compare import curve_metric, plot

    server_only = [
        {
            "arm": a,
            "split": "s",
            "rounds": [
                {"round": 0, "server-accuracy": 0.25},
                {"round": 1, "bytes-up-total": 10},
                {"round": 2, "server-accuracy": 0.8},
            ],
        }
        for a in ("x", "y")
    ]
    assert curve_metric(server_only)[0] == "server-accuracy"
    personal = [
        {"arm": "x", "split": "s", "rounds": [{"round": 1, "server-accuracy": 0.5, "personal-accuracy-mean": 0.7}]}
    ]
    assert curve_metric(personal)[0] == "personal-accuracy-mean"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a legend has no lines: the old, empty plot
        plot(server_only, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0


def _comparison(tmp_path, grid="[1e-3, 5e-3]"):
    f = tmp_path / "c.toml"
    f.write_text(f"""[compare]
name = "t"
select_on = "server-val-accuracy"
[base.run]
rounds = 1
[base.data]
dataset = "../shared/data/agnews"
validation_fraction = 0.1
[[arm]]
name = "a"
set = ["lora.rank=4"]
grid = {{"train.learning_rate" = {grid}}}
""")
    return f


def _finished_run(folder, cfg, accuracy):
    """What a finished run leaves behind that a comparison reads: its config and summary."""
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(cfg.to_toml())
    (folder / "summary.json").write_text("{}")
    return {
        "arm": "a",
        "split": "default",
        "strategy": cfg.federation.strategy,
        "grid-point": [],
        "selection-score": 0.0,
        "run_dir": str(folder),
        "seconds": 1.0,
        "rounds": [{"round": 1, "server-accuracy": accuracy, "server-val-accuracy": accuracy}],
    }


def test_resume_reuses_a_finished_run_only_for_the_cell_whose_config_it_ran(tmp_path):
    import json

    from fedlora.compare import OTHER_CELL, OTHER_CONFIG, comparison_cells, reusable

    f, out = _comparison(tmp_path), tmp_path / "out"
    _, _, cells, _ = comparison_cells(f, out)
    assert [c["grid-point"] for c in cells] == [["train.learning_rate=0.001"], ["train.learning_rate=0.005"]]
    # Runs made before the grid existed (other names, other folders) stand for the grid points they equal.
    earlier = [
        _finished_run(tmp_path / "r1", cells[0]["config"], 0.5),
        _finished_run(tmp_path / "r2", cells[1]["config"], 0.7),
    ]
    assert reusable(earlier[0], cells[0]) is None and reusable(earlier[1], cells[0]) == OTHER_CONFIG
    assert reusable({**earlier[0], "arm": "b"}, cells[0]) == OTHER_CELL
    (tmp_path / "r1" / "summary.json").unlink()
    assert "did not finish" in reusable(earlier[0], cells[0])
    (tmp_path / "r1" / "summary.json").write_text("{}")
    out.mkdir()
    (out / "results.json").write_text(json.dumps(earlier[::-1]))
    log: list[str] = []
    compare(f, out, resume=True, log=log.append)  # nothing left to run: no simulation starts
    assert sum("reusing" in m for m in log) == 2
    results = json.loads((out / "results.json").read_text())
    assert [r["grid-point"] for r in results] == [c["grid-point"] for c in cells]  # in the file's order
    table = json.loads((out / "table.json").read_text())
    assert table[0]["chosen"] == "train.learning_rate=0.005" and table[0]["validation-score"] == 0.7
    assert (out / "plot.png").exists()


def test_named_arms_run_alone_and_the_other_arms_recorded_results_are_tabled_with_them(tmp_path):
    """--arm: a comparison that gained an arm runs only that arm; the others' recorded results (their
    run folders long gone) are kept as they are and chosen from as before."""
    import json

    from fedlora.compare import comparison_cells

    f, out = _comparison(tmp_path), tmp_path / "out"
    f.write_text(f.read_text() + '[[arm]]\nname = "b"\nset = ["lora.rank=2"]\n')
    _, _, cells, _ = comparison_cells(f, out)
    mine = [_finished_run(tmp_path / f"r{i}", c["config"], 0.5 + i / 10) for i, c in enumerate(cells[:2])]
    for r, c in zip(mine, cells[:2]):
        r["grid-point"] = c["grid-point"]
    recorded_b = {
        **mine[0],
        "arm": "b",
        "run_dir": str(tmp_path / "gone"),
        "grid-point": [],
        "rounds": [{"round": 1, "server-accuracy": 0.9, "server-val-accuracy": 0.9}],
    }
    out.mkdir()
    (out / "results.json").write_text(json.dumps([recorded_b, *mine]))
    log: list[str] = []
    compare(f, out, resume=True, arms=["a"], log=log.append)  # a's cells are reusable: nothing runs
    assert sum("reusing" in m for m in log) == 2 and any("keeping the recorded results of ['b']" in m for m in log)
    results = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in results] == ["b", "a", "a"] and results[0] == recorded_b
    table = {r["arm"]: r for r in json.loads((out / "table.json").read_text())}
    assert table["b"]["server-accuracy"] == 0.9 and table["a"]["validation-score"] == 0.6
    with pytest.raises(ConfigError, match="'c'"):
        compare(f, out, arms=["c"], log=log.append)


def test_dry_run_validates_every_cell_and_runs_none(tmp_path):
    f, out = _comparison(tmp_path), tmp_path / "out"
    log: list[str] = []
    compare(f, out, dry_run=True, log=log.append)
    assert sum("would run" in m for m in log) == 2 and not out.exists()
    f = _comparison(tmp_path, grid="[1e-3, -1.0]")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        compare(f, out, dry_run=True, log=log.append)


def test_every_shipped_config_and_comparison_validates():
    """simulations/ is what the README tells users to run: each file must load, every comparison cell too."""
    import tomllib
    from pathlib import Path

    from fedlora.compare import comparison_cells
    from fedlora.config import FedLoraConfig

    root = Path(__file__).resolve().parents[1] / "simulations"
    files = sorted(root.glob("*.toml"))
    assert len(files) >= 10
    for path in files:
        raw = tomllib.loads(path.read_text())
        if "arm" in raw:
            _, _, cells, _ = comparison_cells(path, Path("/nonexistent"))
            assert cells, path
        else:
            FedLoraConfig.load(path)


def test_a_kept_continual_result_is_summarised_from_its_recorded_rows():
    """A result whose run folder is gone (kept as recorded) still gets its accuracy matrix figures."""
    from fedlora.compare import summarise

    rows = [
        {"round": 0},
        {
            "round": 1,
            "continual-task": 0,
            "continual-accuracy": {"a": 0.8},
            "continual-accuracy-task-aware": {"a": 0.9},
        },
        {
            "round": 2,
            "continual-task": 1,
            "continual-accuracy": {"a": 0.5, "b": 0.7},
            "continual-accuracy-task-aware": {"a": 0.8, "b": 0.75},
        },
    ]
    got = summarise({"arm": "x", "split": "s", "run_dir": "/nowhere", "rounds": rows, "seconds": 1.0})
    assert got["continual-average-accuracy"] == pytest.approx(0.6)
    assert got["continual-bwt"] == pytest.approx(-0.3)
    assert got["continual-task-aware-average-accuracy"] == pytest.approx(0.775)

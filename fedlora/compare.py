"""`fedlora compare`: several strategies on the same data, splits, seed and budget, as one command.

A comparison file is a run config under ``[base]`` plus ``[[arm]]`` (a strategy or setting to
compare) and ``[[split]]`` (a data split to compare on) tables, each with a ``name`` and a list of
``set`` overrides. Every arm runs on every split; results go to ``<out>/``:
``results.json`` (every round of every run), ``table.md`` / ``table.json`` (final figures) and
``plot.png`` (accuracy vs round and vs cumulative bytes).

Fair comparisons: an arm may carry a ``grid`` (``grid = {"train.learning_rate" = [1e-3, 3e-3]}``,
several keys form their product). Every grid point runs; the one whose final
``[compare] select_on`` metric (default ``personal-val-accuracy-mean``, the clients' local
validation splits) is highest represents the arm, and its *test* figures are reported. Choosing
needs ``data.validation_fraction > 0``: a grid is never chosen on a test split.

Every cell is validated before any runs (``--dry-run`` stops there). ``--resume`` reuses the cells an
earlier ``results.json`` in the output folder holds, when the saved config of that run is the cell's.
"""

from __future__ import annotations

import itertools
import json
import time
import tomllib
from pathlib import Path

from fedlora.config import ConfigError, FedLoraConfig, apply_override
from fedlora.rundir import atomic_write
from fedlora.simulate import simulate


def load_comparison(path: Path) -> tuple[dict, list[dict], list[dict], str, str]:
    """A comparison file's (base, arms, splits, name, select_on), its tables checked."""
    raw = tomllib.loads(Path(path).read_text())
    unknown = set(raw) - {"base", "arm", "split", "compare"}
    if unknown:
        raise ConfigError(
            f"unknown table(s) {sorted(unknown)} in comparison file {path}; use [base], [[arm]], [[split]], [compare]"
        )
    arms = raw.get("arm") or []
    splits = raw.get("split") or [{"name": "default", "set": []}]
    if not arms:
        raise ConfigError(f"comparison file {path} has no [[arm]]")
    name = raw.get("compare", {}).get("name", Path(path).stem)
    select_on = raw.get("compare", {}).get("select_on", "personal-val-accuracy-mean")
    for item in arms + splits:
        if "name" not in item:
            raise ConfigError(f"every [[arm]] and [[split]] needs a name (in {path})")
    for arm in arms:
        grid = arm.get("grid", {})
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError(f"[[arm]] {arm['name']!r}: grid must map keys to non-empty lists of values")
    return raw.get("base", {}), arms, splits, name, select_on


def grid_points(arm: dict) -> list[list[str]]:
    """The overrides of every point of an arm's grid ([[]] without a grid)."""
    grid = arm.get("grid", {})
    keys = sorted(grid)
    return [
        [f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)] for combo in itertools.product(*(grid[k] for k in keys))
    ]


def selection_score(rows: list[dict], metric: str) -> float:
    """The final value of ``metric`` (a validation metric) in a run's rows; -inf when absent."""
    vals = [r[metric] for r in rows if r.get(metric) is not None]
    return float(vals[-1]) if vals else float("-inf")


def _config(base: dict, overrides: list[str], out: Path, label: str) -> FedLoraConfig:
    raw = json.loads(json.dumps(base))
    for item in overrides:
        apply_override(raw, item)
    raw.setdefault("run", {})["name"] = label
    raw["run"]["output_dir"] = str(out / "runs")
    return FedLoraConfig.from_dict(raw)


def comparison_cells(
    path: Path, out: Path | None = None, extra: list[str] | None = None
) -> tuple[str, str, list[dict], Path]:
    """Every cell of a comparison (arm x split x grid point) as a validated config: a bad arm, split or
    grid point fails here, before any cell has run. Returns (name, select_on, cells, out), ``out``
    defaulting to runs/compare-<name>."""
    base, arms, splits, name, select_on = load_comparison(path)
    out = Path(out or Path("runs") / f"compare-{name}")
    cells = []
    for s in splits:
        for a in arms:
            points = grid_points(a)
            for i, point in enumerate(points):
                label = f"{a['name']}-{s['name']}" + (f"-g{i}" if len(points) > 1 else "")
                cfg = _config(
                    base, list(s.get("set", [])) + list(a.get("set", [])) + point + list(extra or []), out, label
                )
                if len(points) > 1 and cfg.data.validation_fraction <= 0:
                    raise ConfigError(
                        f"[[arm]] {a['name']!r} has a grid, which is chosen on validation splits: "
                        "set data.validation_fraction > 0 in [base.data]"
                    )
                cells.append({"arm": a["name"], "split": s["name"], "grid-point": point, "config": cfg})
    return name, select_on, cells, out


OTHER_CELL, OTHER_CONFIG = "another arm or split", "its config differs from this cell's"


def reusable(result: dict, cell: dict) -> str | None:
    """Why an earlier result cannot stand for ``cell`` (None when it can): the same arm and split, and a
    finished run whose saved config.toml is this cell's config. The config is compared, not the cell's
    label or grid point, so a result stands only for the experiment it ran."""
    if (result.get("arm"), result.get("split")) != (cell["arm"], cell["split"]):
        return OTHER_CELL
    run = Path(result.get("run_dir") or "")
    if not result.get("run_dir") or not (run / "config.toml").exists():
        return f"its run folder {result.get('run_dir')!r} has no config.toml"
    if not (run / "summary.json").exists():
        return f"its run {run} did not finish (no summary.json)"
    try:
        ran = FedLoraConfig.load(run / "config.toml")
    except ConfigError as exc:
        return f"its config no longer loads ({exc})"
    if ran.experiment() != cell["config"].experiment():
        return OTHER_CONFIG
    return None


def _cell_label(cell: dict) -> str:
    return f"{cell['arm']} on {cell['split']} {' '.join(cell['grid-point'])}".rstrip()


def compare(
    path: Path,
    out: Path | None = None,
    extra: list[str] | None = None,
    log=print,
    resume: bool = False,
    dry_run: bool = False,
    arms: list[str] | None = None,
    engine: str = "ray",
) -> Path:
    """Run every cell and write results.json (after each cell), table.md/json and plot.png.

    ``resume``: a cell whose experiment an earlier ``<out>/results.json`` already holds (same arm and
    split, a finished run with this cell's exact config) is not run again; a comparison stopped halfway
    goes on where it stopped, and one whose file gained a grid point runs only the new point.
    ``dry_run``: validate every cell and log what would run (or be reused), run nothing.
    ``arms``: run only these arms' cells; every other arm's results in ``<out>/results.json`` are kept
    as recorded there (not rerun, not re-validated) and the table is made over all of them.
    ``engine``: as ``fedlora simulate``'s; the federation, and so every figure, is the same on either."""
    name, select_on, cells, out = comparison_cells(path, out, extra)
    earlier, kept = [], []
    if (resume or arms) and (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
    if arms:
        unknown = set(arms) - {c["arm"] for c in cells}
        if unknown:
            raise ConfigError(f"--arms names arms the comparison file does not have: {sorted(unknown)}")
        cells = [c for c in cells if c["arm"] in arms]
        kept = [r for r in earlier if r["arm"] not in arms]
        earlier = earlier if resume else []
        log(f"[compare {name}] keeping the recorded results of {sorted({r['arm'] for r in kept})}")
    plan = []
    for cell in cells:
        why = [(r, reusable(r, cell)) for r in earlier]
        found = next((r for r, reason in why if reason is None), None)
        plan.append((cell, found))
        what = _cell_label(cell)
        if found is not None:
            log(f"[compare {name}] {what}: reusing {found['run_dir']}")
            continue
        for r, reason in why:
            if reason not in (None, OTHER_CELL, OTHER_CONFIG):  # only a same-cell run gone wrong is news
                log(f"[compare {name}] {what}: not reusing {r.get('run_dir')}: {reason}")
        if dry_run:
            log(
                f"[compare {name}] {what}: would run ({cell['config'].run.rounds} rounds, "
                f"{cell['config'].federation.strategy})"
            )
    if dry_run:
        return out
    out.mkdir(parents=True, exist_ok=True)

    results = list(kept)
    for cell, found in plan:
        if found is not None:
            results.append(
                {
                    **found,
                    "grid-point": cell["grid-point"],
                    "selection-score": selection_score(found["rounds"], select_on),
                }
            )
            continue
        cfg = cell["config"]
        log(f"[compare {name}] {_cell_label(cell)} ...")
        t0 = time.perf_counter()
        run_dir = simulate(cfg, engine=engine)
        rows = run_dir.read_metrics()
        results.append(
            {
                "arm": cell["arm"],
                "split": cell["split"],
                "strategy": cfg.federation.strategy,
                "grid-point": cell["grid-point"],
                "selection-score": selection_score(rows, select_on),
                "run_dir": str(run_dir.path),
                "seconds": time.perf_counter() - t0,
                "rounds": rows,
            }
        )
        atomic_write(out / "results.json", json.dumps(results, indent=1))
        log(f"[compare {name}] {cell['arm']} on {cell['split']}: {summarise(results[-1])}")
    atomic_write(out / "results.json", json.dumps(results, indent=1))
    chosen = choose(results)
    table = [summarise(r) for r in chosen]
    atomic_write(out / "table.json", json.dumps(table, indent=2))
    atomic_write(out / "table.md", markdown_table(table))
    plot(chosen, out / "plot.png")
    return out


def choose(results: list[dict]) -> list[dict]:
    """Per (arm, split), the grid point with the best validation score (first one on ties)."""
    best: dict[tuple, dict] = {}
    for r in results:
        key = (r["arm"], r["split"])
        if key not in best or r["selection-score"] > best[key]["selection-score"]:
            best[key] = r
    for r in best.values():
        r["candidates"] = [
            {"grid-point": x["grid-point"], "selection-score": x["selection-score"]}
            for x in results
            if (x["arm"], x["split"]) == (r["arm"], r["split"])
        ]
    return list(best.values())


def _continual_from_rows(rows: list[dict]) -> dict | None:
    """The continual summary of recorded metrics rows (the tasks in the order the rows first name them;
    multi-task training evaluates every task at its first evaluation)."""
    from fedlora.continual.metrics import from_rows  # light: math and torch's tensor type only

    measured = [r for r in rows if r.get("continual-accuracy")]
    if not measured:
        return None
    tasks: list[str] = []
    for r in measured:
        tasks += [t for t in r["continual-accuracy"] if t not in tasks]
    multitask = len(measured[0]["continual-accuracy"]) == len(tasks) > 1 and int(measured[0]["continual-task"]) == 0
    out = from_rows(rows, tasks, multitask)
    out["task-aware"] = from_rows(rows, tasks, multitask, key="continual-accuracy-task-aware")
    return out


def summarise(result: dict) -> dict:
    rows = result["rounds"]
    last = rows[-1]
    evals = [r for r in rows if r.get("personal-accuracy-mean") is not None]
    best = max(evals, key=lambda r: r["personal-accuracy-mean"]) if evals else {}
    return {
        "arm": result["arm"],
        "split": result["split"],
        "server-accuracy": last.get("server-accuracy"),
        "personal-accuracy-mean": evals[-1]["personal-accuracy-mean"] if evals else None,
        "personal-accuracy-worst": evals[-1]["personal-accuracy-worst"] if evals else None,
        "personal-global-accuracy": last.get("personal-global-accuracy-mean"),
        "best-personal-accuracy-mean": best.get("personal-accuracy-mean"),
        "upload-bytes-per-client-round": last.get("bytes-up-per-client"),
        "download-bytes-per-client-round": last.get("bytes-down-per-client"),
        "total-bytes": sum(r.get("bytes-up-total", 0) + r.get("bytes-down-total", 0) for r in rows),
        "aggregate-ms-per-round": 1000 * sum(r.get("aggregate-seconds", 0) for r in rows[1:]) / max(len(rows) - 1, 1),
        "global-rank": last.get("global-rank"),
        "seconds": round(result["seconds"], 1),
        **{k: v for k, v in last.items() if k.startswith("server-accuracy-rank-")},
        **{k: last[k] for k in ("client-epsilon", "dp-sgd-epsilon-max") if last.get(k) is not None},
        **_continual_figures(result),
        "chosen": " ".join(result.get("grid-point") or []) or None,
        "validation-score": None
        if result.get("selection-score", float("-inf")) == float("-inf")
        else result["selection-score"],
    }


def _continual_figures(result: dict) -> dict:
    """A task sequence's average accuracy, BWT, forgetting and R: from the run's summary, or, where its
    folder is gone (a result kept as recorded), from the metrics rows the result holds."""
    path = Path(result.get("run_dir", "")) / "summary.json"
    if result.get("run_dir") and path.exists():
        cont = json.loads(path.read_text()).get("continual")
    else:
        cont = _continual_from_rows(result.get("rounds") or [])
    if not cont:
        return {}
    aware = cont.get("task-aware") or {}
    return {
        "continual-average-accuracy": cont.get("average-accuracy"),
        "continual-bwt": cont.get("bwt"),
        "continual-forgetting": cont.get("forgetting"),
        "continual-R": cont.get("R"),
        "continual-task-aware-average-accuracy": aware.get("average-accuracy"),
        "continual-task-aware-bwt": aware.get("bwt"),
        "continual-task-aware-R": aware.get("R"),
    }


def markdown_table(table: list[dict]) -> str:
    cols = [
        "split",
        "arm",
        "server-accuracy",
        "personal-accuracy-mean",
        "personal-accuracy-worst",
        "personal-global-accuracy",
        "upload-bytes-per-client-round",
        "download-bytes-per-client-round",
        "total-bytes",
        "aggregate-ms-per-round",
        "global-rank",
        "seconds",
        "chosen",
        "validation-score",
    ]

    def fmt(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if v < 10 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    extra = sorted(
        {k for row in table for k in row if k.startswith("server-accuracy-rank-")},
        key=lambda k: int(k.rsplit("-", 1)[1]),
    )
    extra += [
        k
        for k in (
            "client-epsilon",
            "dp-sgd-epsilon-max",
            "continual-average-accuracy",
            "continual-bwt",
            "continual-forgetting",
            "continual-task-aware-average-accuracy",
            "continual-task-aware-bwt",
        )
        if any(k in row for row in table)
    ]
    cols = cols[:3] + extra + cols[3:]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in table]
    return "\n".join(lines) + "\n"


def curve_metric(results: list[dict]) -> tuple[str, str]:
    """What a comparison's curves show: the clients' personalized accuracy where they evaluated, else the
    server's accuracy of the global adapter (a federation without client evaluation, e.g. 500 DP clients)."""
    if any(x.get("personal-accuracy-mean") is not None for r in results for x in r["rounds"]):
        return "personal-accuracy-mean", "mean client accuracy (personalized)"
    return "server-accuracy", "server accuracy (global adapter, held-out)"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({r["split"] for r in results})
    fig, axes = plt.subplots(len(splits), 2, figsize=(13, 4.5 * len(splits)), squeeze=False)
    for i, split in enumerate(splits):
        in_split = [r for r in results if r["split"] == split]
        metric, what = curve_metric(in_split)
        for r in in_split:
            rows = [x for x in r["rounds"] if x.get(metric) is not None]
            if not rows:
                continue
            cum, total = [], 0
            for x in r["rounds"]:
                total += x.get("bytes-up-total", 0) + x.get("bytes-down-total", 0)
                if x.get(metric) is not None:
                    cum.append(total / 1e6)
            acc = [x[metric] for x in rows]
            axes[i][0].plot([x["round"] for x in rows], acc, marker="o", label=r["arm"])
            axes[i][1].plot(cum, acc, marker="o", label=r["arm"])
        axes[i][0].set_title(f"{split}: by round", fontsize=10)
        axes[i][1].set_title(f"{split}: by cumulative MB on the wire", fontsize=10)
        axes[i][0].set_xlabel("round")
        axes[i][1].set_xlabel("cumulative MB on the wire (all clients)")
        for ax in axes[i]:
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    ranked = [r for r in results if any(k.startswith("server-accuracy-rank-") for k in r["rounds"][-1])]
    if ranked:  # accuracy of the final global adapter truncated to each evaluated rank
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in ranked:
            pts = sorted(
                (int(k.rsplit("-", 1)[1]), v)
                for k, v in r["rounds"][-1].items()
                if k.startswith("server-accuracy-rank-") and v is not None
            )
            ax.plot(*zip(*pts), marker="o", label=f"{r['arm']} ({r['split']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank the global adapter is truncated to")
        ax.set_ylabel("server accuracy (held-out)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_name("plot-ranks.png"), dpi=100)
        plt.close(fig)

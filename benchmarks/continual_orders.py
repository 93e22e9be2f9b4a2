"""The continual comparison on O-LoRA's three task orders (issue 40), so an ordering claim rests on
three orders, not one::

    python -m benchmarks continual_orders [--arm NAME ...] [--order 2 --order 3] [--resume]

Order 1 is ``simulations/compare_continual.toml`` as it stands (dbpedia, amazon, yelp, agnews); its
figures are read from ``benchmarks/results/compare-continual/table.json``. Orders 2 and 3 are
O-LoRA's (yahoo replaced by yelp, as in order 1): the same four tasks, the same base config, seed and
budget, with ``continual.order`` set. Each arm runs at the grid point the comparison chose for it on
order 1's validation parts (no grid per order: a choice never made on test, and a third of the
cost), on the in-process engine (the same federation as Flower's engine, without Ray on 2 cores).

Writes ``benchmarks/results/continual-orders/``: ``orders.json`` (every run, then per arm the mean,
standard deviation, minimum and maximum over the orders it has), ``table.md`` and ``orders.png``.
Each run is written as it finishes; ``--resume`` skips the (order, arm) pairs already there at the
same point. About 7 minutes a run on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import RESULTS, ROOT, continual_arm, machine, setup_env

ORDERS = {
    1: ["dbpedia", "amazon", "yelp", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yelp"],
    3: ["yelp", "amazon", "agnews", "dbpedia"],
}
ORDER_ONE = RESULTS / "compare-continual" / "table.json"
OUT = RESULTS / "continual-orders"
FIGURES = ("average-accuracy", "bwt", "task-aware-average-accuracy")


def chosen_points() -> dict[str, list[str]]:
    """Per arm, the grid point order 1's comparison chose (its ``chosen`` overrides)."""
    return {r["arm"]: (r.get("chosen") or "").split() for r in json.loads(ORDER_ONE.read_text())}


def order_one_rows() -> list[dict]:
    return [
        {
            "order": 1,
            "arm": r["arm"],
            "point": (r.get("chosen") or "").split(),
            "average-accuracy": r["continual-average-accuracy"],
            "bwt": r["continual-bwt"],
            "task-aware-average-accuracy": r["continual-task-aware-average-accuracy"],
            "R": r["continual-R"],
            "source": str(ORDER_ONE.relative_to(ROOT)),
        }
        for r in json.loads(ORDER_ONE.read_text())
    ]


def run_one(order: int, arm: str, point: list[str]) -> dict:
    from fedlora.simulate import simulate

    cfg = continual_arm(arm, [f"continual.order={json.dumps(ORDERS[order])}", *point], OUT)
    assert cfg.continual.task_names() == ORDERS[order]
    t0 = time.perf_counter()
    run_dir = simulate(cfg, engine="inprocess")
    s = json.loads((run_dir.path / "summary.json").read_text())["continual"]
    return {
        "order": order,
        "arm": arm,
        "point": point,
        "tasks": s["tasks"],
        "average-accuracy": s.get("average-accuracy"),
        "bwt": s.get("bwt"),
        "task-aware-average-accuracy": s["task-aware"].get("average-accuracy"),
        "R": s.get("R"),
        "amlora-routing": s.get("amlora-routing"),
        "seconds": round(time.perf_counter() - t0),
        "run": str(run_dir.path),
    }


def summarise(runs: list[dict]) -> dict:
    out: dict = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["order"])
        out[arm] = {"orders": [r["order"] for r in mine]}
        for f in FIGURES:
            vals = [r[f] for r in mine if r.get(f) is not None]
            if vals:
                out[arm][f] = {
                    "per-order": vals,
                    "mean": statistics.fmean(vals),
                    "std": statistics.pstdev(vals),
                    "min": min(vals),
                    "max": max(vals),
                }
    return out


def table(summary: dict) -> str:
    lines = [
        "| arm | orders | task-agnostic avg acc per order | mean | std | BWT mean | task-aware mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        acc = s.get("average-accuracy")
        if not acc:
            continue
        per = " / ".join(f"{v:.3f}" for v in acc["per-order"])
        bwt = s.get("bwt", {}).get("mean")
        aware = s.get("task-aware-average-accuracy", {}).get("mean")
        lines.append(
            f"| {arm} | {','.join(map(str, s['orders']))} | {per} | {acc['mean']:.3f} | {acc['std']:.3f} | "
            f"{'-' if bwt is None else f'{bwt:+.3f}'} | {'-' if aware is None else f'{aware:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in runs))
    fig, ax = plt.subplots(figsize=(1.2 * len(arms) + 3, 4))
    for i, arm in enumerate(arms):
        mine = [r for r in runs if r["arm"] == arm and r.get("average-accuracy") is not None]
        vals = [r["average-accuracy"] for r in mine]
        if not vals:
            continue
        ax.bar(i, statistics.fmean(vals), color="0.85", edgecolor="0.4")
        for r in mine:
            ax.scatter(i, r["average-accuracy"], marker=f"${r['order']}$", s=90, color="C0")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("task-agnostic average accuracy")
    ax.set_title("O-LoRA's task orders 1-3 (digits: the order; bar: the mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(arms: list[str], orders: list[int], resume: bool) -> dict:
    OUT.mkdir(parents=True, exist_ok=True)
    points = chosen_points()
    arms = arms or list(points)
    unknown = set(arms) - set(points)
    if unknown:
        raise SystemExit(f"no order-1 result for arm(s) {sorted(unknown)} in {ORDER_ONE}")
    path = OUT / "orders.json"
    done = json.loads(path.read_text())["runs"] if resume and path.exists() else []
    runs = [r for r in done if r["order"] != 1]
    for order in orders:
        for arm in arms:
            if any(r["order"] == order and r["arm"] == arm and r["point"] == points[arm] for r in runs):
                print(f"order {order} {arm}: kept from {path}", flush=True)
                continue
            print(f"order {order} {arm} at {' '.join(points[arm])} ...", flush=True)
            runs = [r for r in runs if not (r["order"] == order and r["arm"] == arm)]
            runs.append(run_one(order, arm, points[arm]))
            _write(runs, path)
    return _write(runs, path)


def _write(runs: list[dict], path) -> dict:
    every = order_one_rows() + sorted(runs, key=lambda r: (r["order"], r["arm"]))
    every = [r for r in every if any(x["arm"] == r["arm"] for x in runs)]  # arms with another order
    result = {"benchmark": "continual_orders", "machine": machine(), "orders": ORDERS, "runs": runs}
    result["summary"] = summarise(every)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    (OUT / "table.md").write_text(table(result["summary"]))
    plot(every, OUT / "orders.png")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", dest="arms", action="append", default=[], help="an arm of the comparison (repeatable)")
    ap.add_argument("--order", dest="orders", action="append", type=int, default=[], help="2 or 3 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="keep the runs orders.json already holds")
    args = ap.parse_args()
    bad = set(args.orders) - {2, 3}
    if bad:
        raise SystemExit(f"--order takes 2 or 3 (order 1 is the comparison's own), got {sorted(bad)}")
    setup_env()
    print(main(args.arms, args.orders or [2, 3], args.resume)["summary"])

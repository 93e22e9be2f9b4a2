"""AM-LoRA's routing on the continual comparison (issue 40: measure the selector before changing it).

Runs the AM-LoRA point ``simulations/compare_continual.toml`` chose (its [[arm]] "am-lora" at the
grid point given below) and keeps, per stage, the mean attention each seen task's test inputs give
the zero LoRA and every task's LoRA, with the accuracy matrix beside it::

    python -m benchmarks amlora_routing [--set key=value ...]

Writes ``benchmarks/results/amlora-routing/``: ``routing.json`` (the stages, R, the config point)
and ``amlora-routing.png``. About 20 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil

from benchmarks.common import RESULTS, ROOT, machine, setup_env

POINT = ["continual.amlora_selector_lr=0.05", "train.learning_rate=0.001"]  # the comparison's chosen point


def run(extra: list[str]) -> dict:
    from fedlora.compare import comparison_cells
    from fedlora.simulate import simulate

    _, _, cells, _ = comparison_cells(ROOT / "simulations" / "compare_continual.toml", None, extra)
    (cell,) = [c for c in cells if c["arm"] == "am-lora" and sorted(c["grid-point"]) == sorted(POINT)]
    run_dir = simulate(cell["config"])
    summary = json.loads((run_dir.path / "summary.json").read_text())["continual"]
    out = RESULTS / "amlora-routing"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "amlora_routing",
        "machine": machine(),
        "point": POINT + list(extra),
        "tasks": summary["tasks"],
        "stages": summary.get("amlora-routing", []),
        "R": summary["R"],
        "average-accuracy": summary["average-accuracy"],
        "bwt": summary["bwt"],
        "task-aware-average-accuracy": summary["task-aware"]["average-accuracy"],
        "run": str(run_dir.path),
    }
    (out / "routing.json").write_text(json.dumps(result, indent=1) + "\n")
    if (run_dir.path / "amlora-routing.png").exists():
        shutil.copy(run_dir.path / "amlora-routing.png", out / "amlora-routing.png")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="an override for the run")
    args = ap.parse_args()
    setup_env()
    print(json.dumps({k: v for k, v in run(args.extra).items() if k != "machine"}, indent=1))

"""AM-LoRA's routing on the continual comparison (issue 40): per stage, the mean attention each seen
task's test inputs give the zero LoRA and every task's LoRA, with the accuracy matrix beside it::

    python -m benchmarks amlora_routing [--router input-keys|lora-outputs] [--set key=value ...]

Runs the AM-LoRA arm of ``simulations/compare_continual.toml`` at the point given below for the
router (``lora-outputs``: the point the comparison chose for that router when it was the only one;
``input-keys``: the point it chose for this router), with ``--set`` applied last.

Writes ``benchmarks/results/amlora-routing/``: ``routing-<router>.json`` (the stages, R, the config
point) and ``amlora-routing-<router>.png``. About 20 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil

from benchmarks.common import RESULTS, continual_arm, machine, setup_env

POINTS = {  # per router, the overrides of the comparison's chosen point
    "lora-outputs": ["continual.amlora_selector_lr=0.05", "train.learning_rate=0.001"],
    "input-keys": ["continual.amlora_temperature=0.25", "train.learning_rate=0.001"],
}


def run(router: str, extra: list[str]) -> dict:
    from fedlora.simulate import simulate

    point = [f"continual.amlora_router={router}", *POINTS[router], *extra]
    run_dir = simulate(continual_arm("am-lora", point))
    summary = json.loads((run_dir.path / "summary.json").read_text())["continual"]
    out = RESULTS / "amlora-routing"
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "amlora_routing",
        "machine": machine(),
        "router": router,
        "point": point,
        "tasks": summary["tasks"],
        "stages": summary.get("amlora-routing", []),
        "R": summary["R"],
        "average-accuracy": summary["average-accuracy"],
        "bwt": summary["bwt"],
        "task-aware-average-accuracy": summary["task-aware"]["average-accuracy"],
        "run": str(run_dir.path),
    }
    (out / f"routing-{router}.json").write_text(json.dumps(result, indent=1) + "\n")
    if (run_dir.path / "amlora-routing.png").exists():
        shutil.copy(run_dir.path / "amlora-routing.png", out / f"amlora-routing-{router}.png")
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--router", choices=sorted(POINTS), default="input-keys")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="an override for the run")
    args = ap.parse_args()
    setup_env()
    print(json.dumps({k: v for k, v in run(args.router, args.extra).items() if k != "machine"}, indent=1))

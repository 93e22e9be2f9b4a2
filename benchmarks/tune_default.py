"""Choose the embedded default run's training settings on a validation split, never the test set.

Runs `fedlora simulate`'s default (fortunes, all-MiniLM-L6-v2, 10 clients, Dirichlet 0.5, FedIT)
with ``data.validation_fraction`` set, over a small grid of learning rates and batch sizes, and
writes every candidate's validation accuracy, test accuracy and wall time to
``benchmarks/results/tune-default.json``. The default in ``fedlora/defaults.toml`` is the
candidate with the best *validation* accuracy among those that finish in about two minutes.

    python -m benchmarks.tune_default            # ~12 minutes on 2 CPU cores
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

GRID = [  # a first pass (lr 3e-3, 1e-2, 3e-2 at batch 16) put the stable optimum near 1e-2
    {"train.learning_rate": 1e-2, "train.batch_size": 16},
    {"train.learning_rate": 1.5e-2, "train.batch_size": 16},
    {"train.learning_rate": 1e-2, "train.batch_size": 16, "lora.target_modules": '["query","key","value"]'},
    {"train.learning_rate": 1e-2, "train.batch_size": 16, "run.rounds": 4},
    {"train.learning_rate": 5e-3, "train.batch_size": 8},
]


def main(argv: list[str]) -> None:
    from fedlora.config import FedLoraConfig
    from fedlora.simulate import simulate

    out = Path(__file__).parent / "results" / "tune-default.json"
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-tune-"))
    for point in GRID:
        overrides = (
            [f"{k}={v}" for k, v in point.items()]
            + ["data.validation_fraction=0.1", "federation.evaluate_every=1", f'run.output_dir="{tmp}"']
            + argv
        )
        cfg = FedLoraConfig.load(None, overrides)
        t0 = time.perf_counter()
        rows = simulate(cfg).read_metrics()
        res = {
            "settings": point,
            "seconds": time.perf_counter() - t0,
            "val-accuracy": [r.get("server-val-accuracy") for r in rows],
            "test-accuracy": [r.get("server-accuracy") for r in rows],
        }
        print(json.dumps(res), flush=True)
        results.append(res)
        out.write_text(json.dumps(results, indent=1))
    best = max(results, key=lambda r: r["val-accuracy"][-1])
    print("chosen on validation:", json.dumps(best))


if __name__ == "__main__":
    main(sys.argv[1:])

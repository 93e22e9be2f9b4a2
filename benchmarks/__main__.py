"""One entry point for every benchmark: ``python -m benchmarks NAME [ARGS]``.

    python -m benchmarks                 # the standard set (benchmarks/run.py), then the summary table
    python -m benchmarks list            # every NAME
    python -m benchmarks wire            # one benchmark of the standard set or its extras (run.py --only NAME)
    python -m benchmarks mutation --only continual   # a benchmark with its own options: its module, with ARGS

Results go to ``benchmarks/results/`` (JSON, and a plot where the benchmark draws one).
"""

from __future__ import annotations

import runpy
import sys

from benchmarks.run import ALL, EXTRA
from benchmarks.run import main as run_main

# Benchmarks with their own command line (each module's __main__).
STANDALONE = [
    "mutation",
    "train_step",
    "sketch_quality",
    "tune_default",
    "same_behaviour",
    "amlora_routing",
    "attacks",
    "continual_orders",
    "amlora_keys",
    "update_geometry",
]


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("-"):
        sys.argv = ["benchmarks.run", *argv]
        run_main()
        return
    name, rest = argv[0], argv[1:]
    if name == "list":
        print("\n".join([*ALL, *EXTRA, *STANDALONE]))
    elif name in ALL or name in EXTRA:
        sys.argv = ["benchmarks.run", "--only", name, *rest]
        run_main()
    elif name in STANDALONE:
        sys.argv = [f"benchmarks.{name}", *rest]
        runpy.run_module(f"benchmarks.{name}", run_name="__main__", alter_sys=True)
    else:
        raise SystemExit(f"unknown benchmark {name!r}; `python -m benchmarks list` names them all")


if __name__ == "__main__":
    main(sys.argv[1:])

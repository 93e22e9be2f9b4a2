"""Shared helpers of the benchmark suite: environment, machine description, RSS sampling, output."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


def setup_env() -> None:
    from fedlora.env import apply_defaults

    apply_defaults(offline=True)
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="fedlora-bench-flwr-"))


def continual_arm(arm: str, overrides: list[str], out: Path | None = None):
    """The run config of ``arm`` of ``simulations/compare_continual.toml`` with ``overrides`` applied
    after its grid point (so they replace it; runs under ``out``/runs, default runs/compare-continual)."""
    from fedlora.compare import comparison_cells

    _, _, cells, _ = comparison_cells(ROOT / "simulations" / "compare_continual.toml", out, overrides)
    return next(c for c in cells if c["arm"] == arm)["config"]


def machine() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import flwr
        import peft
        import transformers

        info.update({"flwr": flwr.__version__, "peft": peft.__version__, "transformers": transformers.__version__})
    except ImportError:
        pass
    return info


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


def set_task_identity() -> None:
    """A process that builds Flower Messages outside a running app sets its identity first."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class PeakRSS:
    """Samples the resident memory of this process and all its children (Ray workers) every 0.2 s."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for p in [self._proc] + self._proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plot_bars(path: Path, title: str, labels: list[str], values: list[float], goal: float | None, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    if goal is not None:
        ax.axhline(goal, color="tab:red", linestyle="--", label=f"goal {goal}")
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

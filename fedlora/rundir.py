"""A run directory: config snapshot, per-round metrics, adapters, plots.

Layout::

    <run>/config.toml        the validated config, every default filled in
    <run>/metrics.jsonl      one JSON object per round (round 0 = before training)
    <run>/summary.json       final figures
    <run>/adapter/           the global adapter (PEFT save_pretrained; PeftModel.from_pretrained loads it)
    <run>/adapters/<client>/ personalized adapters (strategies with private parts)
    <run>/client_state/      the client-state store (simulation)
    <run>/plot.png           accuracy and bytes per round
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from fedlora.config import FedLoraConfig


def atomic_write(path: Path, text: str) -> None:
    # lazy: pulls in torch, which this module does not need otherwise
    from fedlora.state import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def scalars(row: dict) -> dict[str, float]:
    """A metrics row's finite numbers as TensorBoard tags, grouped by their first word:
    ``server-accuracy`` is ``server/accuracy``, ``bytes-up-total`` is ``bytes/up-total``."""
    out = {}
    for key, value in row.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            head, _, rest = key.partition("-")
            out[f"{head}/{rest}" if rest else key] = float(value)
    return out


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._board: Any = None  # a TensorBoard SummaryWriter, once enable_tensorboard() is called

    def enable_tensorboard(self) -> None:
        """From now on :meth:`append_metrics` also writes each row's numbers as TensorBoard scalars in
        ``<run dir>/tensorboard`` (a resumed run appends to the same folder)."""
        from torch.utils.tensorboard import SummaryWriter

        if self._board is None:
            self._board = SummaryWriter(log_dir=str(self.path / "tensorboard"))

    @classmethod
    def create(cls, cfg: FedLoraConfig) -> RunDir:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.run.output_dir) / f"{cfg.run_name()}-{stamp}"
        path, i = base, 1
        while path.exists():
            path = Path(f"{base}-{i}")
            i += 1
        return cls(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg: FedLoraConfig) -> None:
        atomic_write(self.path / "config.toml", cfg.to_toml())

    def append_metrics(self, row: dict) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self._board is not None:
            for tag, value in scalars(row).items():
                self._board.add_scalar(tag, value, global_step=int(row["round"]))
            self._board.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def write_checkpoint(self, tensors: dict, state: dict) -> None:
        """The strategy's state after a round, written atomically (tensors first, then the JSON that
        names the round: a crash between the two leaves the previous round's JSON, which a reader
        detects by its digest of the tensor file)."""
        import hashlib

        # lazy: pulls in torch, which this module does not need otherwise
        from fedlora.state import atomic_write_bytes, tensors_to_bytes

        data = tensors_to_bytes(tensors)
        atomic_write_bytes(self.path / "checkpoint" / "global.safetensors", data)
        state = {**state, "tensors-sha256": hashlib.sha256(data).hexdigest()}
        atomic_write(self.path / "checkpoint" / "state.json", json.dumps(state, indent=1, sort_keys=True))

    def read_checkpoint(self) -> tuple[dict, dict] | None:
        import hashlib

        # lazy: pulls in torch, which this module does not need otherwise
        from fedlora.state import tensors_from_file

        sp, tp = self.path / "checkpoint" / "state.json", self.path / "checkpoint" / "global.safetensors"
        if not sp.exists() or not tp.exists():
            return None
        state = json.loads(sp.read_text())
        if hashlib.sha256(tp.read_bytes()).hexdigest() != state.get("tensors-sha256"):
            raise ValueError(f"checkpoint in {self.path} is torn: its tensors do not match its state")
        tensors, _ = tensors_from_file(tp)
        return tensors, state

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.path / "summary.json", json.dumps(summary, indent=2, sort_keys=True))

    def plot(self, baselines: dict[str, float] | None = None) -> Path | None:
        """Accuracy and bytes per round; ``baselines`` (e.g. chance, majority class) as dashed lines."""
        rows = self.read_metrics()
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        rounds = [r["round"] for r in rows]
        scored = any(r.get("server-accuracy") is not None or r.get("personal-accuracy-mean") is not None for r in rows)
        curves = (
            (
                ("server-accuracy", "global (server, held-out)"),
                ("personal-accuracy-mean", "personalized mean"),
                ("personal-accuracy-worst", "personalized worst client"),
            )
            if scored
            # a causal LM on free-form instructions: loss per response token
            else (("server-loss", "global (server, held-out)"), ("personal-loss", "personalized (clients)"))
        )
        for key, label in curves:
            pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax1.plot(*zip(*pts), marker="o", label=label)
        eps = [
            (r["round"], r.get("client-epsilon", r.get("dp-sgd-epsilon-max")))
            for r in rows
            if r.get("client-epsilon", r.get("dp-sgd-epsilon-max")) is not None
        ]
        if eps:
            twin = ax1.twinx()
            twin.plot(*zip(*eps), color="tab:red", linestyle=":", marker="x", label="epsilon spent")
            twin.set_ylabel("epsilon spent", color="tab:red")
        for i, (name, value) in enumerate(sorted((baselines or {}).items())):
            ax1.axhline(value, linestyle="--", color=("0.5", "0.7", "0.3")[i % 3], label=f"{name} ({value:.2f})")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.set_xlabel("round")
        ax1.set_ylabel("accuracy" if scored else "loss per response token")
        ax1.legend()
        ax1.grid(alpha=0.3)
        ax2.bar([r - 0.2 for r in rounds], [r.get("bytes-up-total", 0) / 1e6 for r in rows], width=0.4, label="up")
        ax2.bar([r + 0.2 for r in rounds], [r.get("bytes-down-total", 0) / 1e6 for r in rows], width=0.4, label="down")
        ax2.set_xlabel("round")
        ax2.set_ylabel("MB on the wire (all clients)")
        ax2.legend()
        ax2.grid(alpha=0.3)
        fig.suptitle(self.path.name)
        fig.tight_layout()
        out = self.path / "plot.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


def round_line(row: dict) -> str:
    """One console line of a round's metrics row: accuracy, loss, clients, epsilon, bytes, rejections,
    replies a robust bound cut (each named on its own line by the recorder), replies over the
    client-level DP clip, time."""
    parts = [f"round {row['round']}"]
    shown = {"server-accuracy": "acc", "personal-accuracy-mean": "personal acc", "personal-accuracy-worst": "worst"}
    for key, label in {**shown, "server-loss": "loss", "server-perplexity": "ppl"}.items():
        if row.get(key) is not None:
            parts.append(f"{label} {row[key]:.3f}")
    if row.get("clients-accepted") is not None:
        parts.append(f"{row['clients-accepted']}/{row.get('clients-sampled')} clients")
    if row.get("client-epsilon") is not None:
        parts.append(f"eps {row['client-epsilon']:.2f}")
    if row.get("dp-sgd-epsilon-max") is not None:
        parts.append(f"dp-sgd eps {row['dp-sgd-epsilon-max']:.2f}")
    if row.get("bytes-up-per-client"):
        parts.append(f"up {row['bytes-up-per-client'] / 1e3:.1f} kB/client")
    if row.get("rejected"):
        parts.append(f"{len(row['rejected'])} rejected")
    if row.get("clipped"):
        parts.append(f"{len(row['clipped'])} bounded")
    if row.get("clients-clipped"):  # client-level DP: how many its clip cut, and how many far beyond it
        far = row.get("clients-far-beyond-clip") or 0
        parts.append(f"{row['clients-clipped']} over the DP clip" + (f" ({far} far beyond)" if far else ""))
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)

"""The round recorder: one metrics row per round (the server's evaluation, what the round log
holds, bytes, times), appended to the run directory's ``metrics.jsonl`` with a checkpoint after it,
and the run's summary at the end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fedlora.config import FedLoraConfig
from fedlora.rundir import RunDir
from fedlora.strategies.base import LoraStrategy

log = logging.getLogger("fedlora.server")


class RoundRecorder:
    """Records the rounds of ``strategy``'s run into ``run_dir`` (when given) and hands every row to
    ``on_round``. ``raw_bytes``: the raw bytes of one client's factors in the run's wire dtype."""

    def __init__(
        self,
        cfg: FedLoraConfig,
        strategy: LoraStrategy,
        run_dir: RunDir | None,
        on_round: Callable[[dict], None] | None,
        raw_bytes: int,
    ) -> None:
        self.cfg, self.strategy, self.run_dir, self.on_round, self.raw_bytes = (
            cfg,
            strategy,
            run_dir,
            on_round,
            raw_bytes,
        )
        self._last = time.perf_counter()

    def record(self, server_round: int, evaluation: dict[str, Any]) -> dict[str, Any]:
        """The row of ``server_round``: written (metrics line, then checkpoint: a crash in between
        loses no learning, and a resume drops the orphan line), handed on, returned."""
        strategy = self.strategy
        row: dict[str, Any] = {"round": server_round, "strategy": strategy.strategy_name, **evaluation}
        rl = strategy.rounds.get(server_round)
        if rl is not None:
            row.update(
                {
                    "clients-sampled": rl.sampled,
                    "clients-accepted": rl.accepted,
                    "rejected": rl.rejected,
                    "rejected-evaluate": rl.rejected_evaluate,
                    "flagged": rl.flagged,
                    "clipped": rl.clipped,
                    "skipped": rl.skipped or None,
                    "aggregation-error": rl.aggregation_error or None,
                    "bytes-up-total": sum(rl.bytes_up),
                    "bytes-down-total": sum(rl.bytes_down),
                    "bytes-up-per-client": _mean(rl.bytes_up),
                    "bytes-down-per-client": _mean(rl.bytes_down),
                    "payload-up-per-client": _mean(rl.payload_up),
                    "payload-down-per-client": _mean(rl.payload_down),
                    "aggregate-seconds": rl.aggregate_seconds,
                    "server-seconds": rl.server_seconds,
                    "train-loss": rl.train_metrics.get("train-loss"),
                    "client-train-seconds": rl.train_metrics.get("train-seconds"),
                    **dict(rl.eval_metrics.items()),
                    "clients": [
                        {k: c[k] for k in ("client-id", "accuracy", "num-examples", "global-accuracy") if k in c}
                        for c in rl.eval_clients
                    ],
                }
            )
        row["global-rank"] = strategy.global_rank()
        if rl is not None:
            for line in rl.clipped + rl.flagged:  # every client a bound cut, on the console as in the row
                log.warning("round %d: %s", server_round, line)
            if rl.dylora_rank is not None:
                row["dylora-rank"] = rl.dylora_rank
            row.update(rl.figures)
        row["raw-factor-bytes-per-client"] = self.raw_bytes
        now = time.perf_counter()
        row["seconds"] = now - self._last
        self._last = now
        if self.run_dir is not None:
            self.run_dir.append_metrics(row)
            self.run_dir.write_checkpoint(*strategy.state_dict())
        if self.on_round is not None:
            self.on_round(row)
        return row

    def finish(self, label_names: list[str], baselines: dict[str, float], seconds: float) -> None:
        """The run's summary (final row, bytes, privacy spent, every extension's entries) and plot."""
        if self.run_dir is None:
            return
        strategy, rows = self.strategy, self.run_dir.read_metrics()
        last = rows[-1] if rows else {}
        summary = {
            "strategy": strategy.strategy_name,
            "rounds": self.cfg.run.rounds,
            "seconds": seconds,
            "baselines": baselines,
            "label-names": label_names,
            "privacy": {},
            "final": {k: v for k, v in last.items() if k != "clients"},
            "bytes-up-total": sum(r.get("bytes-up-total", 0) for r in rows),
            "bytes-down-total": sum(r.get("bytes-down-total", 0) for r in rows),
        }
        for e in strategy.extensions:
            for key, value in e.finish_run(rows, self.run_dir.path).items():
                if isinstance(value, dict) and isinstance(summary.get(key), dict):
                    summary[key].update(value)
                else:
                    summary[key] = value
        self.run_dir.write_summary(summary)
        self.run_dir.plot(baselines)


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0

"""What a strategy saw in one round, read by the server to write the round's row of metrics.jsonl."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fedlora import codec

log = logging.getLogger("fedlora.server")


@dataclass
class RoundLog:
    """What the strategy saw in one round (read by the server to write metrics.jsonl)."""

    server_round: int = 0
    sampled: int = 0
    accepted: int = 0
    rejected: list[str] = field(default_factory=list)
    rejected_evaluate: list[str] = field(default_factory=list)
    flagged: list[str] = field(default_factory=list)
    clipped: list[str] = field(default_factory=list)
    skipped: str = ""
    aggregation_error: str = ""
    bytes_down: list[int] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    payload_down: list[int] = field(default_factory=list)
    payload_up: list[int] = field(default_factory=list)
    aggregate_seconds: float = 0.0
    server_seconds: float = 0.0  # CPU seconds validating, bounding and folding replies, and finishing the round
    dylora_rank: int | None = None
    released_by: str = ""  # the extension whose round_release aggregates this round ('': the strategy's fold)
    # The round's figures from its release, fold and extensions (noise, clip, sketch error).
    figures: dict = field(default_factory=dict)
    train_metrics: dict = field(default_factory=dict)
    eval_metrics: dict = field(default_factory=dict)
    eval_clients: list[dict] = field(default_factory=list)
    sent: dict[str, list[int]] = field(default_factory=dict)  # message type -> nodes messaged
    sizer_up: codec.MessageSizer = field(default_factory=codec.MessageSizer)  # exact for a sample, then estimated
    sizer_down: codec.MessageSizer = field(default_factory=codec.MessageSizer)

    def reject(self, line: str) -> None:
        """Name a reply left out of the round's fold (``line``: who, and why): in the round's row
        and, as it happens, on the console."""
        self.rejected.append(line)
        log.warning("round %d: rejected reply from %s", self.server_round, line)


def weighted_metrics(metrics: list[dict], weights: list[float]) -> dict:
    """The round's client metrics: example-weighted means, but bytes, seconds and rank as per-client
    means; ``num-examples`` the total weight."""
    total = sum(weights)
    keys = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float))}
    keys.discard("partition-id")
    out = {}
    for k in sorted(keys):
        vals = [(float(m[k]), w) for m, w in zip(metrics, weights) if k in m]
        if k.startswith("bytes") or k.endswith("seconds") or k == "rank":
            out[k] = sum(v for v, _ in vals) / len(vals)  # per-client means, unweighted
        else:
            out[k] = sum(v * w for v, w in vals) / max(total, 1e-12)
    out["num-examples"] = int(total)
    return out

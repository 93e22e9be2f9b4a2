"""What the hostile-client defences cost the server per round, at 10 and 100 clients.

MiniLM-shaped FedIT updates (12 modules of 384 x 384 at rank 8, and a 4-label head): the plain
weighted mean is the baseline; next to it, in the same run, the coordinate median, the trimmed
mean, the norm bound (one clip per client against the global it started from), the share cap,
and the full reply validation of every reply (exact key set, shapes, dtype, scalars, finiteness)
through the strategy's real ``validate_reply``. Writes benchmarks/results/robust.json and a plot.
"""

from __future__ import annotations

from benchmarks.aggregation import _time as _best
from benchmarks.aggregation import pool
from benchmarks.common import RESULTS, write


def run(quick: bool = False) -> dict:
    import torch
    from flwr.app import MetricRecord, RecordDict

    from fedlora import codec
    from fedlora.config import FedLoraConfig
    from fedlora.lora_math import to_effective, weighted_mean
    from fedlora.protocol import NodeProfile
    from fedlora.robust import cap_shares, clip_update, coordinate_median, trimmed_mean
    from fedlora.strategies import FedIT

    base = pool("minilm", 8)
    for f in base:
        f.extras = {"classifier.weight": torch.randn(4, 384) * 0.01, "classifier.bias": torch.zeros(4)}
    start = base[0].clone()
    cfg = FedLoraConfig.load(None, ["lora.rank=8", "lora.alpha=8"])
    strategy = FedIT(cfg, start)
    rows = []
    for k in (10, 100):
        ups = [base[i % len(base)] for i in range(k)]
        eff = [to_effective(u) for u in ups]
        w = [float(1 + i % 7) for i in range(k)]
        prof = NodeProfile(1, "c", 0, 8, 8.0, 10_000, 10)
        replies = [
            RecordDict(
                {
                    "arrays": codec.encode(u, modules=strategy.module_names),
                    "metrics": MetricRecord({"num-examples": 5, "rank": 8}),
                }
            )
            for u in ups
        ]
        rep = 3
        row = {
            "clients": k,
            "mean_s": _best(lambda: weighted_mean(eff, w), rep),
            "median_s": _best(lambda: coordinate_median(eff), rep),
            "trimmed_mean_s": _best(lambda: trimmed_mean(eff, 0.2), rep),
            "norm_clip_s": _best(lambda: [clip_update(start, u, 0.01) for u in ups], rep),
            "share_cap_s": _best(lambda: cap_shares(w, 0.1), rep),
            "validate_s": _best(lambda: [strategy.validate_reply(prof, r) for r in replies], rep),
        }
        for key in ("median_s", "trimmed_mean_s", "norm_clip_s", "validate_s"):
            row[key.replace("_s", "_over_mean")] = row[key] / row["mean_s"]
        rows.append(row)
        print(row, flush=True)
    _plot(rows)
    write("robust", {"shape": "all-MiniLM-L6-v2 LoRA r=8 (q,v) + 4-label head", "rows": rows})
    return {"rows": rows}


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["mean_s", "median_s", "trimmed_mean_s", "norm_clip_s", "validate_s"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(rows):
        ax.bar(
            [j + 0.4 * i for j in range(len(keys))],
            [row[k] * 1000 for k in keys],
            width=0.4,
            label=f"{row['clients']} clients",
        )
    ax.set_xticks([j + 0.2 for j in range(len(keys))], [k[:-2].replace("_", " ") for k in keys])
    ax.set_ylabel("ms per round (server)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("cost of the robust options, MiniLM-shaped FedIT updates")
    fig.tight_layout()
    fig.savefig(RESULTS / "robust.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run()

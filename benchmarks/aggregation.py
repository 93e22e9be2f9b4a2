"""Server aggregation time for 10, 100 and 1000 client updates, MiniLM- and 7B-shaped adapters.

Synthetic factors of the right shapes (MiniLM: 6 layers x q,v of 384 x 384; a 7B decoder:
32 layers x q,v of 4096 x 4096), ranks 8 and 16, through the same pure functions the strategies
call. To keep 1000 7B-sized updates inside this machine's memory, the update objects are views of
a pool of 10 distinct updates: the arithmetic (and its memory traffic through the chunked
reduction) is the real one. FLoRA and FlexLoRA scale with the stacked rank sum(r_k): where that
exceeds what is sensible to hold (a 7B stack of 1000 clients is 16,000 wide, larger than the
module), the cell is skipped and its cost model stated instead.
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import RESULTS, write
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import aggregate_stacked, aggregate_svd, weighted_mean

SHAPES = {"minilm": (12, 384, 384), "7b": (64, 4096, 4096)}  # modules, out, in


def pool(kind: str, rank: int, n: int = 10) -> list[LoraFactors]:
    modules, out_dim, in_dim = SHAPES[kind]
    g = torch.Generator().manual_seed(rank)
    res = []
    for _ in range(n):
        f = LoraFactors()
        for m in range(modules):
            f.modules[f"layers.{m // 2}.{'qv'[m % 2]}"] = ModuleFactors(
                A=torch.randn(rank, in_dim, generator=g) * 0.01,
                B=torch.randn(out_dim, rank, generator=g) * 0.01,
                alpha=float(rank),
            )
        res.append(f)
    return res


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool = False) -> dict:
    rows = []
    counts = [10, 100] if quick else [10, 100, 1000]
    for kind in ("minilm", "7b"):
        for rank in (8, 16):
            base = pool(kind, rank)
            a_only = [f.select({"A"}) for f in base]
            for k in counts:
                ups = [base[i % len(base)] for i in range(k)]
                ups_a = [a_only[i % len(a_only)] for i in range(k)]
                w = [float(1 + i % 7) for i in range(k)]
                cell = {"shape": kind, "rank": rank, "clients": k}
                rep = 3 if kind == "minilm" else 1
                cell["fedit_s"] = _time(lambda: weighted_mean(ups, w), rep)
                cell["fedsa_s"] = _time(lambda: weighted_mean(ups_a, w), rep)
                _, out_dim, in_dim = SHAPES[kind]
                stacked_rank = rank * k
                if kind == "minilm" or stacked_rank <= 1600:
                    cell["flora_stack_s"] = _time(lambda: aggregate_stacked(ups, w), rep)
                else:
                    cell["flora_stack_s"] = None
                    cell["flora_note"] = (
                        f"stacked rank {stacked_rank} > 1600: skipped (memory ~ {stacked_rank * (out_dim + in_dim) * 4 * SHAPES[kind][0] / 1e9:.0f} GB)"
                    )
                if kind == "minilm" or stacked_rank <= 160:
                    cell["flexlora_svd_s"] = _time(lambda: aggregate_svd(ups, w, rank), rep)
                else:
                    cell["flexlora_svd_s"] = None
                    cell["flexlora_note"] = (
                        f"stacked rank {stacked_rank}: cost ~ 2 QR of (4096 x {min(stacked_rank, 4096)}) + "
                        f"SVD of {min(stacked_rank, 4096)}^2 per module x 64 modules; skipped"
                    )
                rows.append(cell)
                print(
                    f"  aggregation {kind:6s} r={rank:2d} K={k:4d}: fedit {cell['fedit_s'] * 1e3:9.1f} ms  "
                    f"fedsa {cell['fedsa_s'] * 1e3:9.1f} ms  flora {_ms(cell['flora_stack_s'])}  "
                    f"flexlora {_ms(cell['flexlora_svd_s'])}",
                    flush=True,
                )
    # Linearity of averaging in the number of clients.
    lin = {}
    for kind in ("minilm", "7b"):
        for rank in (8, 16):
            cells = {c["clients"]: c for c in rows if c["shape"] == kind and c["rank"] == rank}
            if 10 in cells and counts[-1] in cells:
                lin[f"{kind}-r{rank}"] = {
                    "fedit_time_ratio": cells[counts[-1]]["fedit_s"] / cells[10]["fedit_s"],
                    "clients_ratio": counts[-1] / 10,
                }
    _plot(rows, counts)
    payload = {"rows": rows, "linearity": lin}
    write("aggregation", payload)
    return payload


def _ms(v: float | None) -> str:
    return "   skipped" if v is None else f"{v * 1e3:9.1f} ms"


def _plot(rows: list[dict], counts: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("minilm", "7b")):
        for key, label in (
            ("fedit_s", "FedIT"),
            ("fedsa_s", "FedSA"),
            ("flora_stack_s", "FLoRA"),
            ("flexlora_svd_s", "FlexLoRA"),
        ):
            for rank, style in ((8, "-"), (16, "--")):
                pts = [(c["clients"], c[key]) for c in rows if c["shape"] == kind and c["rank"] == rank and c.get(key)]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{label} r{rank}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("client updates")
        ax.set_ylabel("seconds")
        ax.set_title(f"aggregation time, {kind} shapes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "aggregation.png", dpi=100)
    plt.close(fig)

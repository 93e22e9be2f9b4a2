"""The single-pass sketch of FlexLoRA/FLoRA against the exact rank-r truncation of the same sum.

One 1024 x 1024 module, 200 replies of ranks 8, 12 and 16 (mixed) whose weighted sum is a shared
rank-8 update plus each client's own noise (noise 0: the sum has rank 8; 0.03, 0.1, 0.3: a rising
tail). For each ``hetero.sketch_oversampling`` in the grid, the sketch read at rank 16 is compared
with the best rank-16 approximation of the exact sum (its SVD): the figure is the ratio of their
errors, ``||X - X_sketch|| / ||X - X_16||`` (1 = as good as the exact truncation), with the
round's own error estimate beside the true error (the worst of three sketch seeds). A second part
runs the round's own fold at the default settings on the same replies: the form it picks within
``hetero.exact_budget_mb`` and its ratio. Writes benchmarks/results/sketch_quality.json.

    .venv/bin/python -m benchmarks.sketch_quality        # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import functools

from benchmarks.common import RESULTS, setup_env, write

DIM, CLIENTS, RANK = 1024, 200, 16
NOISES = (0.0, 0.03, 0.1, 0.3)
OVERSAMPLING = (16, 32, 48, 64, 80, 96)
SKETCH_SEEDS = (1, 2, 3)


def replies(noise: float, seed: int = 0):
    import torch

    from fedlora.factors import LoraFactors, ModuleFactors

    g = torch.Generator().manual_seed(seed)
    U, V = torch.randn(DIM, 8, generator=g) / DIM**0.25, torch.randn(8, DIM, generator=g) / DIM**0.25
    out = []
    for k in range(CLIENTS):
        r = (8, 12, 16)[k % 3]
        extra = r - 8
        B = torch.cat([U, noise * torch.randn(DIM, extra, generator=g) / DIM**0.25], 1)
        A = torch.cat([V, noise * torch.randn(extra, DIM, generator=g) / DIM**0.25], 0)
        if extra == 0 and noise > 0:  # a rank-8 client carries its noise in its own factors
            B = B + noise * torch.randn(DIM, 8, generator=g) / DIM**0.25
        out.append((LoraFactors(modules={"m": ModuleFactors(A=A, B=B, alpha=float(r))}), 1.0 + (k % 5)))
    return out


@functools.cache
def _exact(noise: float):
    """(replies, their exact weighted sum X, X's rank-16 truncation error), once per noise level."""
    import torch

    reps = replies(noise)
    total = sum(w for _, w in reps)
    X = sum(w * (u.modules["m"].B.double() @ u.modules["m"].A.double()) for u, w in reps) / total
    best = float(torch.linalg.svdvals(X)[RANK:].square().sum().sqrt())
    return reps, X, best


def _ratio(err: float, best: float, norm: float) -> float:
    return err / best if best > 1e-12 * norm else (1.0 if err <= 1e-6 * norm else float("inf"))


def cell(noise: float, oversampling: int) -> dict:
    """The sketch alone (as the round uses it when no exact form fits), over SKETCH_SEEDS."""
    from fedlora.aggregation.product_sums import SketchedProductSum

    reps, X, best = _exact(noise)
    norm = float(X.norm())
    errs, estimates = [], []
    for seed in SKETCH_SEEDS:
        sketch = SketchedProductSum(RANK, oversampling, seed=seed)
        for u, w in reps:
            sketch.add(u, w)
        got = sketch.result(RANK).modules["m"]
        errs.append(float((X - got.B.double() @ got.A.double()).norm()))
        estimates.append(sketch.last_error)
    ratios = [_ratio(e, best, norm) for e in errs]
    return {
        "noise": noise,
        "oversampling": oversampling,
        "exact_truncation_error": best / norm,
        "sketch_error": max(errs) / norm,
        "sketch_error_estimate": max(estimates),
        "ratio": max(ratios),
        "ratio_mean": sum(ratios) / len(ratios),
        "sketch_seeds": len(SKETCH_SEEDS),
        "sketch_floats_per_dim": (RANK + oversampling) + 2 * (RANK + oversampling) + 1 + 8,
    }


def default_round(noise: float) -> dict:
    """What a FlexLoRA round does with the default hetero settings on these replies: the product
    fold ``LoraStrategy.product_fold`` builds (the form it picks within ``hetero.exact_budget_mb``)
    and its error."""
    from fedlora.aggregation.product_sums import BudgetedProductSum, SketchedProductSum
    from fedlora.config import FedLoraConfig

    reps, X, best = _exact(noise)
    h = FedLoraConfig().hetero
    fold = BudgetedProductSum(
        h.exact_budget_mb * 2**20,
        RANK,
        lambda: SketchedProductSum(RANK, h.sketch_oversampling),
        stack=CLIENTS < h.sketch_from_clients,
    )
    for u, w in reps:
        fold.add(u, w)
    got = fold.result(RANK).modules["m"]
    err = float((X - got.B.double() @ got.A.double()).norm())
    return {
        "noise": noise,
        "product_fold": fold.path,
        "ratio": _ratio(err, best, float(X.norm())),
        "held_mb": fold.held_bytes() / 2**20,
    }


def run() -> dict:
    from fedlora.config import FedLoraConfig

    rows = []
    for p in OVERSAMPLING:
        for noise in NOISES:
            rows.append(cell(noise, p))
            print(
                f"[sketch_quality] oversampling {p:3d} noise {noise:4.2f}: error {rows[-1]['sketch_error']:.4f} "
                f"(estimate {rows[-1]['sketch_error_estimate']:.4f}) vs exact rank-{RANK} "
                f"{rows[-1]['exact_truncation_error']:.4f}: worst ratio over {len(SKETCH_SEEDS)} sketch seeds "
                f"{rows[-1]['ratio']:.3f}",
                flush=True,
            )
    defaults = [default_round(noise) for noise in NOISES]
    for d in defaults:
        print(
            f"[sketch_quality] default settings, noise {d['noise']:4.2f}: {d['product_fold']} "
            f"({d['held_mb']:.1f} MiB held), ratio {d['ratio']:.3f}",
            flush=True,
        )
    worst = {p: max(r["ratio"] for r in rows if r["oversampling"] == p) for p in OVERSAMPLING}
    h = FedLoraConfig().hetero
    payload = {
        "shape": f"{DIM}x{DIM}, {CLIENTS} replies of ranks 8/12/16, read at rank {RANK}",
        "rows": rows,
        "worst_ratio_by_oversampling": worst,
        "default_oversampling": h.sketch_oversampling,
        "default_exact_budget_mb": h.exact_budget_mb,
        "default_rounds": defaults,
    }
    write("sketch_quality", payload)
    _plot(rows)
    return payload


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for noise in NOISES[1:]:
        pts = [r for r in rows if r["noise"] == noise]
        ax.plot([r["oversampling"] for r in pts], [r["ratio"] for r in pts], "o-", label=f"noise {noise}")
    ax.axhline(1.25, color="grey", ls="--", lw=1)
    ax.set_xlabel("hetero.sketch_oversampling")
    ax.set_ylabel("sketch error / exact rank-16 error")
    ax.set_title("FlexLoRA's sketch against the exact truncation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "sketch_quality.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    setup_env()
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    run()

"""Pictures of a continual run's figures (:mod:`fedlora.continual.metrics` computes them): the
accuracy matrix R and AM-LoRA's routing, as PNG heat maps (matplotlib, loaded when drawing)."""

from __future__ import annotations

from pathlib import Path


def plot_matrix(R: list[list[float | None]], tasks: list[str], path, title: str = "") -> None:
    """Heat map of R (rows: after task i; columns: evaluated on task j; blank: not yet seen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    T = len(R)
    m = np.full((T, T), np.nan)
    for i in range(T):
        for j in range(T):
            if R[i][j] is not None:
                m[i, j] = R[i][j]
    fig, ax = plt.subplots(figsize=(1.3 * T + 2, 1.1 * T + 1.5))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w" if m[i, j] < 0.6 else "k")
    ax.set_xticks(range(T), tasks, rotation=30, ha="right")
    ax.set_yticks(range(T), [f"after {t}" for t in tasks])
    ax.set_xlabel("evaluated on")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "accuracy matrix R")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_routing(stages: list[dict], tasks: list[str], path: Path) -> None:
    """One heat map per stage (rows: a seen task's test inputs; columns: the zero LoRA, then each
    task's LoRA): a selector that routes puts the weight on the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages) + 1, 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        seen = list(stage["routing"])
        m = np.array([stage["routing"][t] for t in seen])
        ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(
                    j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w" if m[i, j] < 0.6 else "k", fontsize=7
                )
        ax.set_xticks(range(m.shape[1]), ["zero", *tasks[: m.shape[1] - 1]], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(seen)), seen, fontsize=7)
        ax.set_title(f"after {stage['after']}", fontsize=8)
    fig.suptitle("AM-LoRA: mean attention per task LoRA (rows: inputs of that task)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

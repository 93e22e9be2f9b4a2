"""What honest updates look like on the embedded default task: the figures the robust defaults rest on.

Runs ``fedlora simulate``'s default (MiniLM, fortunes, 10 clients, FedIT, 3 rounds) honestly, in
process, for three Dirichlet 0.5 seeds and one IID split, and records every accepted update as the
server's robust stage sees it (its change from the round's start, effective form, shared parts, and
its example count). Per round it reports:

* ``normalised``: each update's norm / sqrt(its examples), over the round's median (what
  ``robust.relative_norm_bound`` compares; the default bound is 1.5);
* ``plain``: each update's norm over the round's median norm (what a plain norm bound compares);
* ``cos_others``: each update's cosine with the example-weighted sum of the other clients' updates
  (the direction a sign flip reverses);
* ``cos_others_unit``: each update's cosine with the sum of the other clients' update directions
  (each scaled to unit norm);
* ``cos_others_dir``: the same, each direction weighed by min(its examples, the round's median):
  what ``robust.min_cosine`` compares, so that neither a norm inside the bound nor a size claim over
  the median buys a larger say, and a client of a few examples (a noisy direction) has less;
* ``cos_previous``: each update's cosine with the previous round's weighted mean update (what
  centred clipping measures from).

Writes benchmarks/results/update-geometry.json and a plot of normalised and plain ratios against the
example count.

    .venv/bin/python -m benchmarks update_geometry        # about 7 min on 2 cores
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, setup_env, write

SPLITS = [("dirichlet", 42), ("dirichlet", 43), ("dirichlet", 44), ("iid", 42)]


@contextlib.contextmanager
def recording(into: list[dict]):
    """Every update the robust stage is offered, appended to ``into`` as (round, examples, change)."""
    from fedlora.aggregation.bound import MedianBounds
    from fedlora.robust import update_change

    offer = MedianBounds.offer

    def observed(self, update):
        into.append(
            {
                "round": self.server_round,
                "examples": update.weight,
                "change": update_change(self._start(update), update.factors).double(),
            }
        )
        return offer(self, update)

    MedianBounds.offer = observed
    try:
        yield
    finally:
        MedianBounds.offer = offer


def round_figures(updates: list[dict], previous=None) -> dict:
    import torch

    from fedlora.robust import cosines_to_others, direction_weights, gram_matrix

    V = torch.stack([u["change"] for u in updates])
    n = torch.tensor([u["examples"] for u in updates], dtype=torch.float64)
    norms = V.norm(dim=1)
    normalised = norms / n.sqrt()
    total = (n[:, None] * V).sum(0)
    others = total[None, :] - n[:, None] * V
    cos_others = (V * others).sum(1) / (norms * others.norm(dim=1)).clamp_min(1e-300)
    U = V / norms[:, None].clamp_min(1e-300)
    others_unit = U.sum(0)[None, :] - U
    cos_others_unit = (U * others_unit).sum(1) / others_unit.norm(dim=1).clamp_min(1e-300)
    gram = gram_matrix(list(V))  # the direction bound's own reference, as the server takes it
    cos_others_dir = cosines_to_others(gram, direction_weights(n.tolist(), gram), range(len(updates)))
    out = {
        "examples": n.tolist(),
        "normalised": (normalised / normalised.median()).tolist(),
        "plain": (norms / norms.median()).tolist(),
        "cos_others": cos_others.tolist(),
        "cos_others_unit": cos_others_unit.tolist(),
        "cos_others_dir": [cos_others_dir[i] for i in range(len(updates))],
    }
    if previous is not None:
        out["cos_previous"] = ((V @ previous) / (norms * previous.norm()).clamp_min(1e-300)).tolist()
    return out, total / n.sum()


def main() -> dict:
    from fedlora.config import FedLoraConfig
    from fedlora.simulate import simulate

    work = Path(tempfile.mkdtemp(prefix="fedlora-geometry-"))
    runs = []
    for partitioner, seed in SPLITS:
        seen: list[dict] = []
        cfg = FedLoraConfig.load(
            None,
            # The direction bound off, so every honest update is folded and the rounds are the honest ones.
            [
                f"run.seed={seed}",
                f'data.partitioner="{partitioner}"',
                f'run.output_dir="{work}"',
                "robust.min_cosine=-1",
            ],
        )
        with recording(seen):
            simulate(cfg, engine="inprocess")
        rounds, previous = [], None
        for r in sorted({u["round"] for u in seen}):
            figures, previous = round_figures([u for u in seen if u["round"] == r], previous)
            rounds.append({"round": r, **figures})
        runs.append({"partitioner": partitioner, "seed": seed, "rounds": rounds})
        print(f"[update_geometry] {partitioner} seed {seed}: {len(seen)} updates", flush=True)

    def span(key: str) -> list[float]:
        xs = [x for run in runs for r in run["rounds"] for x in r.get(key, [])]
        return [min(xs), max(xs)]

    summary = {
        key: span(key)
        for key in ("normalised", "plain", "cos_others", "cos_others_unit", "cos_others_dir", "cos_previous")
    }
    write("update-geometry", {"splits": SPLITS, "runs": runs, "ranges": summary})
    _plot(runs)
    return summary


def _plot(runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, key, title in (
        (axes[0], "plain", "update norm / round median"),
        (axes[1], "normalised", "norm / sqrt(n), / round median"),
    ):
        for run in runs:
            xs = [x for r in run["rounds"] for x in r["examples"]]
            ys = [y for r in run["rounds"] for y in r[key]]
            ax.scatter(xs, ys, s=10, label=f"{run['partitioner']} {run['seed']}")
        ax.axhline(1.5, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("examples")
        ax.set_title(title)
    axes[0].set_ylabel("ratio (dashed: the default bound, 1.5)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "update-geometry.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    setup_env()
    print(json.dumps(main(), indent=2))

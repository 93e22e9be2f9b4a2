"""Where client-level DP learns: server accuracy against the cohort size m per round, at epsilon 1, 3, 8.

Three parts, each a `fedlora compare` run on the real simulation path (the folding server, Flower's
simulation engine, Opacus-free client-level DP with the accountant's epsilon):

1. ``simulations/compare_privacy_cohorts_tune.toml``: at m = 100 each arm family (non-private FedIT;
   FedIT, FFA-LoRA and DP-DyLoRA at epsilon 8) runs a learning-rate grid, chosen on the server's
   validation split, with every update clipped at C = 1. Grids at every cell would triple a run that
   is already hours long on 2 cores.
2. ``simulations/compare_privacy_cohorts.toml``: every arm at every cohort (m = 100, 1,000, 300), with
   its family's chosen rate and C = 1; one generated ``spec.toml`` per cohort beside its results (the
   m = 100 cohort runs only what part 1 has not: epsilon 1 and 3).
3. ``simulations/compare_privacy_cohorts_clip.toml``: the clip matched to the step. One local AdamW
   step moves each coordinate by at most lr, so a client's change has norm at most lr * sqrt(d) for
   any data; clipping there never binds, and a DP arm trains exactly as the non-private one (lr 0.02)
   with only the noise added. Part 2 showed C = 1 was a smaller learning rate in disguise (FedIT's
   step has norm 2.83).

Figures (``benchmarks/results/dp_cohorts.json`` and ``dp_cohorts.png``): server accuracy per
(arm, clip rule, m, epsilon), the released dimension per arm (measured: payload bytes up / 4), the
noise multiplier z the accountant calibrated, the smallest measured m at which each arm reaches twice
chance at epsilon 8, the best arm at the largest m and epsilon 8 against non-private, and an
extrapolation (marked as one) of the measured law to DP-DyLoRA's headline regime (10^6 clients,
epsilon 2).

The law: with every update clipped to C, the noise on the released mean has norm about
``z * C * sqrt(d) / m`` against a signal of at most C, so accuracy should depend on the run through
``rho = z * sqrt(d) / m``. The extrapolation fits the accuracy lost to DP against log(rho) on the
matched-clip cells (where noise is the only difference from non-private) and evaluates it at the rho
of the headline regime.

    .venv/bin/python -m benchmarks.run --only dp_cohorts     # about 3 hours on 2 CPU cores
    .venv/bin/python -m benchmarks.dp_cohorts --figures      # figures from the parts' results.json only
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, write

TUNE = ROOT / "simulations" / "compare_privacy_cohorts_tune.toml"
COHORTS = ROOT / "simulations" / "compare_privacy_cohorts.toml"
CLIP = ROOT / "simulations" / "compare_privacy_cohorts_clip.toml"
CHANCE = 0.25  # AG News: 4 balanced classes
HEADLINE = {
    "clients": 1_000_000,
    "epsilon": 2.0,
    "per_round": [1_000, 10_000],
    "paper": "DP-DyLoRA (Xu et al. 2024): under 2 points lost at epsilon 2 with 10^6 clients",
}
FIXED, MATCHED = "C = 1", "C = lr * sqrt(d)"  # the two clip rules: parts 1-2, part 3


def _out(name: str) -> Path:
    return RESULTS / f"compare-{name}"


def chosen_rates(chosen: list[dict]) -> dict[str, list[str]]:
    """Each tuned family's chosen grid point (its overrides), from the comparison's own choice
    (:func:`fedlora.compare.choose`)."""
    return {r["arm"]: list(r["grid-point"]) for r in chosen}


def cohort_arm(tuned_arm: str) -> str:
    """A part-1 arm's name in part 2 (the tuning's non-private arm is FedIT's)."""
    return tuned_arm.replace("fedit-non-private", "non-private")


def cohort_specs(rates: dict[str, list[str]], done: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """(split name, TOML text) per cohort: the part-2 file with each arm's family rate added, and only
    the (arm, split) cells part 1 has not already run."""
    import tomli_w

    raw = tomllib.loads(COHORTS.read_text())
    specs = []
    for split in raw["split"]:
        arms = []
        for arm in raw["arm"]:
            if (arm["name"], split["name"]) in done:
                continue
            arms.append({"name": arm["name"], "set": list(arm["set"]) + rates[arm["family"]]})
        if arms:
            spec = {
                "compare": {**raw["compare"], "name": f"{raw['compare']['name']}-{split['name']}"},
                "base": raw["base"],
                "split": [split],
                "arm": arms,
            }
            specs.append((split["name"], tomli_w.dumps(spec)))
    return specs


def cell_configs(spec: Path) -> dict[tuple[str, str, tuple[str, ...]], object]:
    """Each cell's validated config, by (arm, split, grid point), as the comparison itself builds them
    (:func:`fedlora.compare.comparison_cells`): the figures need no run folder."""
    from fedlora.compare import comparison_cells

    _, _, cells, _ = comparison_cells(spec)
    return {(c["arm"], c["split"], tuple(c["grid-point"])): c["config"] for c in cells}


def _released_dim(rows: list[dict]) -> float:
    vals = [r["payload-up-per-client"] for r in rows if r.get("payload-up-per-client")]
    return sum(vals) / len(vals) / 4 if vals else float("nan")  # float32 on the wire


def cell_figures(result: dict, cohort: int, settings: dict, rule: str) -> dict:
    rows = result["rounds"]
    last = rows[-1]
    trained = [r for r in rows if r.get("round", 0) >= 1]
    arm = result["arm"]
    eps = None if "non-private" in arm else float(arm.rsplit("eps", 1)[1])
    z = [r["client-noise-multiplier"] for r in trained if r.get("client-noise-multiplier") is not None]
    d = _released_dim(trained)
    return {
        "arm": arm.rsplit("-eps", 1)[0],
        "cell": arm,
        "clip-rule": rule if eps is not None else None,
        "m": cohort,
        "epsilon-target": eps,
        "server-accuracy": last.get("server-accuracy"),
        "client-epsilon": last.get("client-epsilon"),
        "noise-multiplier": z[0] if z else None,
        "released-dim": d,
        "rho": (z[0] * math.sqrt(d) / cohort) if z else 0.0,
        "seconds-per-round": sum(r["seconds"] for r in trained) / max(len(trained), 1),
        "grid-point": result.get("grid-point"),
        "delta": last.get("client-delta"),
        **settings,
    }


def fit_law(cells: list[dict], reference: dict[int, float]) -> dict | None:
    """Least squares of (non-private accuracy - DP accuracy) against log(rho) over the DP cells."""
    pts = [
        (math.log(c["rho"]), reference[c["m"]] - c["server-accuracy"])
        for c in cells
        if c["rho"] > 0 and c["server-accuracy"] is not None and c["m"] in reference
    ]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    return {
        "slope": slope,
        "intercept": my - slope * mx,
        "points": n,
        "form": "accuracy lost = intercept + slope * ln(rho), rho = z * sqrt(d) / m, clamped to [0, non-private - chance]",
    }


def extrapolate(law: dict, dim: float, rounds: int, reference_acc: float) -> list[dict]:
    from fedlora.privacy.accounting import _calibrate_client_noise

    n = HEADLINE["clients"]
    out = []
    for m in HEADLINE["per_round"]:
        z = _calibrate_client_noise(n, m, rounds, HEADLINE["epsilon"], 1 / n**1.1)
        rho = z * math.sqrt(dim) / m
        lost = min(max(law["intercept"] + law["slope"] * math.log(rho), 0.0), reference_acc - CHANCE)
        out.append(
            {
                "clients": n,
                "per_round": m,
                "rounds": rounds,
                "epsilon": HEADLINE["epsilon"],
                "noise-multiplier": z,
                "released-dim": dim,
                "rho": rho,
                "accuracy-lost-extrapolated": lost,
            }
        )
    return out


def run(quick: bool = False, figures_only: bool = False) -> dict:
    """All three parts (each resumes the cells its folder already holds), then the figures.
    ``figures_only``: the figures from the parts' results.json as they are; nothing runs."""
    from fedlora.compare import choose, compare

    log = lambda s: print(s, flush=True)  # noqa: E731
    tune_out = _out("privacy-cohorts-tune")
    if not figures_only:
        compare(TUNE, tune_out, resume=True, log=log)
    tuned = choose(json.loads((tune_out / "results.json").read_text()))
    rates = chosen_rates(tuned)
    done = {(cohort_arm(r["arm"]), "m100") for r in tuned}
    parts: list[tuple[str, Path, list[dict]]] = [(FIXED, TUNE, tuned)]
    for split, text in cohort_specs(rates, done):
        out = _out(f"privacy-cohorts-{split}")
        out.mkdir(parents=True, exist_ok=True)
        if not figures_only:
            (out / "spec.toml").write_text(text)
            if quick:
                continue
            compare(out / "spec.toml", out, resume=True, log=log)
        parts.append((FIXED, out / "spec.toml", json.loads((out / "results.json").read_text())))
    clip_out = _out("privacy-cohorts-clip")
    if not (figures_only or quick):
        compare(CLIP, clip_out, resume=True, log=log)
    if (clip_out / "results.json").exists():
        parts.append((MATCHED, CLIP, json.loads((clip_out / "results.json").read_text())))
    return figures(parts, rates)


def _summary(dp: list[dict], reference: dict[int, float]) -> dict:
    """Per clip rule: the smallest m reaching twice chance at epsilon 8 per arm, and the best arm at
    the largest m and epsilon 8 against non-private."""
    largest = max(reference)
    smallest = {}
    for arm in sorted({c["arm"] for c in dp}):
        ok = sorted(
            c["m"]
            for c in dp
            if c["arm"] == arm and c["epsilon-target"] == 8 and (c["server-accuracy"] or 0) >= 2 * CHANCE
        )
        smallest[arm] = ok[0] if ok else None
    best = max(
        (c for c in dp if c["m"] == largest and c["epsilon-target"] == 8),
        key=lambda c: c["server-accuracy"] or 0,
        default=None,
    )
    return {
        "smallest-m-twice-chance-eps8": smallest,
        "largest-m": largest,
        "best-eps8-at-largest-m": best
        and {
            "arm": best["arm"],
            "server-accuracy": best["server-accuracy"],
            "client-clip": best["client-clip"],
            "gap-to-non-private": reference[largest] - best["server-accuracy"],
            "within-5-points": reference[largest] - best["server-accuracy"] <= 0.05,
        },
    }


def figures(parts: list[tuple[str, Path, list[dict]]], rates: dict[str, list[str]]) -> dict:
    cells = []
    for rule, spec, results in parts:
        configs = cell_configs(spec)
        for r in results:
            cfg = configs[(r["arm"], r["split"], tuple(r.get("grid-point") or []))]
            settings = {
                "clients": cfg.federation.num_clients,
                "learning-rate": cfg.train.learning_rate,
                "rounds": cfg.run.rounds,
                "client-clip": cfg.privacy.client_clip,
            }
            # m is each spec's min_train_clients (fraction_train * N, every client sampled must train)
            cells.append(
                cell_figures({**r, "arm": cohort_arm(r["arm"])}, cfg.federation.min_train_clients, settings, rule)
            )
    reference = {c["m"]: c["server-accuracy"] for c in cells if c["arm"] == "non-private"}
    rules = [rule for rule in (FIXED, MATCHED) if any(c["clip-rule"] == rule for c in cells)]
    by_rule = {rule: _summary([c for c in cells if c["clip-rule"] == rule], reference) for rule in rules}
    payload = {
        "cells": sorted(cells, key=lambda c: (c["arm"], c["clip-rule"] or "", c["m"], c["epsilon-target"] or 0)),
        "chosen-rates": rates,
        "non-private": reference,
        "by-clip-rule": by_rule,
    }
    # The law from the cells where noise is the only difference from non-private, if part 3 ran.
    law_cells = [c for c in cells if c["clip-rule"] == (MATCHED if MATCHED in rules else FIXED)]
    law = fit_law(law_cells, reference)
    if law is not None:
        dyl = [c["released-dim"] for c in law_cells if c["arm"] == "dp-dylora"] or [
            c["released-dim"] for c in law_cells
        ]
        rounds = max(c.get("rounds") or 0 for c in law_cells)
        payload["law"] = {**law, "clip-rule": law_cells[0]["clip-rule"]}
        payload["extrapolation"] = {
            "marked": "EXTRAPOLATION from the measured law, not a measurement",
            "paper": HEADLINE["paper"],
            "rows": extrapolate(law, sum(dyl) / len(dyl), rounds, reference[max(reference)]),
        }
    write("dp_cohorts", payload)
    plot(payload, RESULTS / "dp_cohorts.png")
    return payload


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps_values = sorted({c["epsilon-target"] for c in payload["cells"] if c["epsilon-target"] is not None})
    fig, axes = plt.subplots(1, len(eps_values), figsize=(4.2 * len(eps_values), 3.8), sharey=True, squeeze=False)
    ref = sorted(payload["non-private"].items())
    colours = {"fedit": "C0", "ffa": "C1", "dp-dylora": "C2"}
    for ax, eps in zip(axes[0], eps_values):
        here = [c for c in payload["cells"] if c["epsilon-target"] == eps]
        for arm, rule in sorted({(c["arm"], c["clip-rule"]) for c in here}):
            pts = sorted(
                (c["m"], c["server-accuracy"])
                for c in here
                if c["arm"] == arm and c["clip-rule"] == rule and c["server-accuracy"] is not None
            )
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=colours.get(arm),
                ls="-" if rule == MATCHED else ":",
                label=f"{arm}, {rule}",
            )
        ax.plot([m for m, _ in ref], [a for _, a in ref], "k--", marker="s", label="non-private")
        ax.axhline(CHANCE, color="grey", lw=0.8)
        ax.axhline(2 * CHANCE, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("clients per round m")
        ax.set_title(f"epsilon {eps:g}")
    axes[0][0].set_ylabel("server accuracy (AG News)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    import argparse

    from benchmarks.common import setup_env

    ap = argparse.ArgumentParser(description="client-level DP against the cohort size (issue 25)")
    ap.add_argument("--figures", action="store_true", help="only the figures, from the parts' results.json")
    setup_env()
    print(json.dumps({k: v for k, v in run(figures_only=ap.parse_args().figures).items() if k != "cells"}, indent=1))

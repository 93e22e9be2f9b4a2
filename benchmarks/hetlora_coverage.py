"""HetLoRA under partial sampling: how much capacity the zero-padding formula loses, and what
``hetero.hetlora_keep_uncovered`` keeps.

Ten clients of ranks [2]*6 + [4]*2 + [8]*2 (rank 8 is 1 in 5 clients), 3 sampled per round for 30
rounds, MiniLM-shaped modules (12 of 384 x 384). Each sampled client returns the global adapter
truncated to its rank, moved by a small random step with a gradient's support (a component whose
A row and B column are both zero gets no step). After each
round we count the global's *dead* rank components: an A row and a B column both exactly zero,
which receive no gradient ever again. Same seeds, same sampling, both formulas, one run.
Writes benchmarks/results/hetlora-coverage.json.
"""

from __future__ import annotations

import random

import torch

from benchmarks.common import write
from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import aggregate_zero_padded, keep_uncovered, to_client, to_effective

RANKS = [2] * 6 + [4] * 2 + [8] * 2
MODULES, DIM, R = 12, 384, 8


def _dead(g: LoraFactors) -> int:
    n = 0
    for m in g.modules.values():
        n += int(((m.A.abs().sum(1) == 0) & (m.B.abs().sum(0) == 0)).sum())
    return n


def simulate(keep: bool, rounds: int = 30, sampled: int = 3, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    g = LoraFactors(
        modules={
            f"m{i}": ModuleFactors(
                A=torch.randn(R, DIM, generator=gen) / DIM**0.5, B=torch.zeros(DIM, R), alpha=float(R)
            )
            for i in range(MODULES)
        }
    )
    dead = []
    for _ in range(rounds):
        picks = rng.sample(range(len(RANKS)), sampled)
        ups = []
        for k in picks:
            r = RANKS[k]
            c = to_client(g, r, 16.0)
            for m in c.modules.values():
                # A gradient step's support: dB[:, i] is proportional to A[i] and dA[i] to B[:, i], so
                # a component whose A row and B column are both zero never moves again.
                live_a = (m.A.abs().sum(1) > 0).float()
                live_b = (m.B.abs().sum(0) > 0).float()
                m.B = m.B + torch.randn(m.B.shape, generator=gen) * 0.01 * live_a
                m.A = m.A + torch.randn(m.A.shape, generator=gen) * 0.01 * live_b.unsqueeze(1)
            ups.append(to_effective(c))
        covered = max(RANKS[k] for k in picks)
        new = aggregate_zero_padded(ups, [1.0] * len(ups), R, sparsity_weighted=True)
        g = keep_uncovered(new, g, covered) if keep else new
        dead.append(_dead(g))
    return dead


def run(quick: bool = False) -> dict:
    rounds = 10 if quick else 30
    zero, keep = simulate(False, rounds), simulate(True, rounds)
    out = {
        "clients": RANKS,
        "sampled_per_round": 3,
        "rounds": rounds,
        "components_total": MODULES * R,
        "dead_components_paper_formula": zero,
        "dead_components_keep_uncovered": keep,
    }
    print(
        f"dead components after {rounds} rounds: paper formula {zero[-1]}/{MODULES * R}, "
        f"keep_uncovered {keep[-1]}/{MODULES * R}"
    )
    write("hetlora-coverage", out)
    return out


if __name__ == "__main__":
    run()

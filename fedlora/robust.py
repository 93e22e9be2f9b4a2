"""Bounding what one client can do to the global adapter: pure functions on factors.

* **Norm bound** (``robust.update_norm_bound``): a client's update is its change from what it
  started the round with, measured in effective form over the parts it shares (A, s*B, head; for
  FFA-LoRA the product's change is exactly s*(B - B0)*A). Above the bound it is scaled back onto
  the bound (``clip``) or dropped (``reject``). The differential-privacy layer reuses this clip.
* **Robust aggregation** (``robust.aggregation``): coordinate-wise median or trimmed mean over the
  clients' effective factors. A and B alone are not identifiable (A R, R^-1 B give the same
  product), but in a round every client starts from the same global adapter, so their factors are
  coordinates in one fixed basis, that adapter's, and a coordinate statistic is meaningful. Both
  ignore example counts, as Flower's FedMedian and FedTrimmedAvg do.
* **Share cap** (``robust.max_client_share``): no client's normalised weight exceeds the cap.
* **Direction** (``robust.min_cosine``): each update's cosine similarity with the sum of the
  round's other update directions (:func:`drop_opposed` with :func:`direction_weights`, from
  their Gram matrix, :func:`gram_matrix`); a sign-flipped update points away from what the others
  teach.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.lora_math import flatten, unflatten


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Normalised weights with none above ``max_share`` (water-filling: the excess of capped
    clients is spread over the others in proportion to their weights). With fewer than
    1/max_share clients the cap cannot hold and the weights become uniform."""
    w = [float(x) for x in weights]
    total = sum(w)
    if not w or total <= 0 or any(x < 0 for x in w):
        raise ValueError(f"weights must be non-negative with a positive sum, got {w}")
    p = [x / total for x in w]
    if max_share >= 1.0:
        return p
    if max_share * len(p) <= 1.0:
        return [1.0 / len(p)] * len(p)
    capped = [False] * len(p)
    while True:
        over = [i for i, x in enumerate(p) if x > max_share + 1e-12 and not capped[i]]
        if not over:
            return p
        for i in over:
            capped[i] = True
        free = 1.0 - max_share * sum(capped)
        rest = sum(x for i, x in enumerate(w) if not capped[i])
        p = [max_share if capped[i] else free * w[i] / rest for i in range(len(w))]


def update_norm(start: LoraFactors, new: LoraFactors) -> float:
    """L2 norm of ``new - start`` in effective form over the tensors ``new`` carries.

    ``start`` may hold more rank than ``new`` (a self-pruned client): its first components count.
    """
    sq = 0.0
    for name, m in new.modules.items():
        s0 = start.modules[name]
        r = m.rank
        if m.A is not None:
            sq += float(((m.A - s0.A[:r]).double() ** 2).sum())
        if m.B is not None:
            sq += float(((m.scaling * m.B - s0.scaling * s0.B[:, :r]).double() ** 2).sum())
    for k, t in new.extras.items():
        sq += float(((t - start.extras[k]).double() ** 2).sum())
    return math.sqrt(sq)


def update_change(start: LoraFactors, new: LoraFactors) -> torch.Tensor:
    """``new - start`` in effective form as one float32 vector, the terms :func:`update_norm` sums
    (its norm is that norm), in one order whatever order ``new`` lists its tensors in (modules by
    name, A then s*B; then the extras by name), so the changes of any two factor sets over the same
    parts line up coordinate by coordinate."""
    parts = []
    for name in sorted(new.modules):
        m, s0 = new.modules[name], start.modules[name]
        r = m.rank
        if m.A is not None:
            parts.append((m.A - s0.A[:r]).flatten())
        if m.B is not None:
            parts.append((m.scaling * m.B - s0.scaling * s0.B[:, :r]).flatten())
    parts += [(new.extras[k] - start.extras[k]).flatten() for k in sorted(new.extras)]
    return torch.cat([p.float() for p in parts]) if parts else torch.zeros(0)


def gram_matrix(changes: Sequence[torch.Tensor], chunk: int = 8192) -> torch.Tensor:
    """The n x n float64 matrix of dot products of ``changes`` (same-length vectors), through
    ``chunk`` coordinates at a time, so it holds one n x chunk block beside the vectors. Entry
    (i, j) depends on changes i and j alone, so reordering the changes permutes the matrix exactly."""
    n = len(changes)
    gram = torch.zeros(n, n, dtype=torch.float64)
    if not n:
        return gram
    length = changes[0].numel()
    if any(c.numel() != length for c in changes):
        raise ValueError("gram_matrix needs changes of one length")
    for lo in range(0, length, chunk):
        block = torch.stack([c[lo : lo + chunk] for c in changes]).double()
        gram += block @ block.T
    return gram


def cosines_to_others(gram: torch.Tensor, weights: Sequence[float], members: Sequence[int]) -> dict[int, float]:
    """For each i in ``members``, the cosine of change i with sum_{j in members, j != i} w_j x change j,
    from the changes' Gram matrix (:func:`gram_matrix`) and ``weights``. A zero change, or others
    that sum to zero, have no direction: the cosine is reported as 1."""
    idx = torch.tensor(list(members), dtype=torch.long)
    g = gram[idx][:, idx]
    w = torch.tensor([float(weights[i]) for i in members], dtype=torch.float64)
    gw = g @ w  # change i . the weighted sum of all members
    total = float(w @ gw)  # |the weighted sum|^2
    diag = torch.diagonal(g)
    dots = gw - w * diag  # change i . the others' weighted sum
    others_sq = total - 2 * w * gw + w * w * diag
    out = {}
    for k, i in enumerate(members):
        # Others' sum at or below the expansion's rounding (relative 1e-12 of its terms) is zero.
        floor = 1e-12 * (total + float(w[k] * w[k] * diag[k]))
        if float(diag[k]) <= 0 or float(others_sq[k]) <= floor:
            out[i] = 1.0
        else:
            out[i] = float(dots[k]) / math.sqrt(float(diag[k]) * float(others_sq[k]))
    return out


def cosine_floor(cosines: Sequence[float], min_cosine: float, spread: float) -> float:
    """The cosine below which a change is dropped: ``min_cosine``, or lower where the round's
    cosines scatter, their median minus ``spread`` robust standard deviations (1.4826 x the median
    absolute deviation, which estimates the standard deviation of normally scattered values and
    which a minority of outliers cannot inflate). ``spread`` 0: ``min_cosine`` alone."""
    if spread <= 0 or not cosines:
        return min_cosine
    med = median(cosines)
    mad = median([abs(c - med) for c in cosines])
    return min(min_cosine, med - spread * 1.4826 * mad)


class Opposed(NamedTuple):
    """What :func:`drop_opposed` decided: [(index, cosine, floor)] dropped, in the order they were;
    its first pass, before any cut: every change's cosine with the others' weighted sum and the
    floor they set (what a round's row reports); and its last: each kept change's cosine with the
    other kept ones' weighted sum, after the last cut, and the floor those set (a kept change
    below it was kept because too few would remain)."""

    dropped: list[tuple[int, float, float]]
    cosines: dict[int, float]
    floor: float
    last: dict[int, float]
    last_floor: float

    @property
    def kept(self) -> list[int]:
        """The indices kept, ascending."""
        return sorted(self.last)


def drop_opposed(
    gram: torch.Tensor,
    weights: Sequence[float],
    min_cosine: float,
    spread: float = 0.0,
    least: int = 3,
    held_to: Mapping[int, float] | None = None,
) -> Opposed:
    """The direction bound: while at least ``least`` (>= 3) changes remain, of those whose cosine with
    the weighted sum of the others (:func:`cosines_to_others`) is below their floor, the lowest is
    dropped, and the cosines are taken again without it, so a dropped change no longer turns the
    others' reference. A change's floor is the round's (:func:`cosine_floor` of the remaining
    changes' cosines), or for a change in ``held_to`` (index -> cosine) the higher of that and the
    round's. Ties go to the lower index: list the changes in a fixed order (the caller sorts them by
    node) and the result does not depend on the order they arrived in."""
    held_to = held_to or {}
    members = list(range(gram.shape[0]))
    first = cosines_to_others(gram, weights, members)
    first_floor = cosine_floor(list(first.values()), min_cosine, spread)
    cos, floor = first, first_floor
    dropped: list[tuple[int, float, float]] = []
    while len(members) >= max(least, 3):
        own = {i: max(floor, held_to.get(i, floor)) for i in members}
        below = [i for i in members if cos[i] < own[i]]
        if not below:
            break
        worst = min(below, key=lambda i: (cos[i], i))
        dropped.append((worst, cos[worst], own[worst]))
        members.remove(worst)
        cos = cosines_to_others(gram, weights, members)
        floor = cosine_floor([cos[i] for i in members], min_cosine, spread)
    return Opposed(dropped, first, first_floor, {i: cos[i] for i in members}, floor)


def spread_share(cos: float, floor: float, min_cosine: float) -> float:
    """The share of the median's weight that a change the spread keeps (``floor <= cos < min_cosine``,
    :func:`cosine_floor`) may carry: its cosine's place between the floor (0) and ``min_cosine``
    (1), so the weight falls continuously to nothing at the floor, where the change would be cut.
    1 for a change at or above ``min_cosine``; 0 below the floor."""
    if cos >= min_cosine:
        return 1.0
    if cos < floor:
        return 0.0
    return (cos - floor) / (min_cosine - floor)


def direction_weights(examples: Sequence[float], gram: torch.Tensor) -> list[float]:
    """Each change's weight in the direction bound's reference: min(its examples, their median) /
    its norm (from ``gram``'s diagonal), so each counts as its direction, neither a norm nor a
    size claim over the median buys more say, and a change of a few examples has less; a zero
    change weighs 0."""
    med = median(examples)
    return [min(n, med) / math.sqrt(g) if g > 0 else 0.0 for n, g in zip(examples, torch.diagonal(gram).tolist())]


def median(xs: Sequence[float]) -> float:
    """The median; for an even count, the mean of the middle two."""
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def clip_update(start: LoraFactors, new: LoraFactors, bound: float) -> tuple[LoraFactors, float]:
    """``start + c * (new - start)`` in effective form, with c = min(1, bound / norm); returned in
    ``new``'s own form (its alpha), together with the norm before clipping."""
    norm = update_norm(start, new)
    if norm <= bound:
        return new, norm
    return scale_update(start, new, bound / norm), norm


def scale_update(start: LoraFactors, new: LoraFactors, c: float) -> LoraFactors:
    """``start + c * (new - start)`` in effective form, returned in ``new``'s own form (its alpha)."""
    out = LoraFactors()
    for name, m in new.modules.items():
        s0 = start.modules[name]
        r = m.rank
        A = None if m.A is None else s0.A[:r] + c * (m.A - s0.A[:r])
        B = None
        if m.B is not None:
            start_eff = s0.scaling * s0.B[:, :r]
            B = (start_eff + c * (m.scaling * m.B - start_eff)) / m.scaling
        out.modules[name] = ModuleFactors(A=A, B=B, alpha=m.alpha)
    out.extras = {k: start.extras[k] + c * (t - start.extras[k]) for k, t in new.extras.items()}
    return out


def coordinate_median(updates: Sequence[LoraFactors]) -> LoraFactors:
    """Element-wise median of same-shaped factor sets (the lower median for an even count)."""
    keys, shapes, alpha, rows = flatten(updates)
    return unflatten(torch.stack(rows).median(dim=0).values, keys, shapes, alpha)


def trimmed_mean(updates: Sequence[LoraFactors], fraction: float) -> LoraFactors:
    """Element-wise mean after dropping the ``floor(fraction * K)`` largest and smallest values."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be in [0, 0.5), got {fraction}")
    keys, shapes, alpha, rows = flatten(updates)
    k = int(math.floor(fraction * len(rows)))
    stacked = torch.stack(rows).sort(dim=0).values
    kept = stacked[k : len(rows) - k]
    return unflatten(kept.mean(dim=0), keys, shapes, alpha)

"""Factor maths: pure functions on tensors, used by the strategies and tested against numpy.

Conventions
-----------
Client k's module adds ``s_k * B_k @ A_k`` to its base weight, with ``s_k = alpha_k / r_k``.
Ranks, and so scalings, differ between clients; to aggregate them together the server works on
*effective* factors, ``(s_k * B_k, A_k)``, whose plain product is the update. A global adapter is
kept in effective form (stored with ``alpha = rank``, i.e. scaling 1). :func:`to_client` turns a
global adapter back into client k's own form: the first ``r_k`` components, B divided by ``s_k``.

Shapes: A is (r, in), B is (out, r), delta W is (out, in).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from fedlora.factors import LoraFactors, ModuleFactors

_CHUNK = 32


def normalise(weights: Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if len(w) == 0 or not torch.all(w >= 0) or float(w.sum()) <= 0:
        raise ValueError(f"aggregation weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


# ---------------------------------------------------------------------------------------------
# effective form
# ---------------------------------------------------------------------------------------------
def to_effective(f: LoraFactors) -> LoraFactors:
    """(s*B, A) per module, stored with alpha = rank (scaling 1). Heads pass through."""
    out = LoraFactors(extras=dict(f.extras))
    for name, m in f.modules.items():
        B = None if m.B is None else m.B * m.scaling
        out.modules[name] = ModuleFactors(A=m.A, B=B, alpha=float(m.rank))
    return out


def to_client(global_eff: LoraFactors, rank: int, alpha: float) -> LoraFactors:
    """Client form of a global effective adapter: first ``rank`` components, B / (alpha/rank).

    Components beyond the global rank are zero (zero-padding): a client may train a larger rank
    than the aggregate currently holds.
    """
    s = alpha / rank
    out = LoraFactors(extras=dict(global_eff.extras))
    for name, m in global_eff.modules.items():
        A = None if m.A is None else _fit_rows(m.A, rank)
        B = None if m.B is None else _fit_cols(m.B, rank) / s
        out.modules[name] = ModuleFactors(A=A, B=B, alpha=alpha)
    return out


def fit_rank(f: LoraFactors, rank: int) -> LoraFactors:
    """The same factors with exactly ``rank`` components: truncated, or zero-padded. Alpha kept."""
    out = LoraFactors(extras=dict(f.extras))
    for name, m in f.modules.items():
        out.modules[name] = ModuleFactors(
            A=None if m.A is None else _fit_rows(m.A, rank),
            B=None if m.B is None else _fit_cols(m.B, rank),
            alpha=m.alpha,
        )
    return out


def block(f: LoraFactors, rank: int) -> LoraFactors:
    """DyLoRA's rank-``rank`` block: A[:b], B[:, :b], stored with the alpha that keeps each raw
    component's scaling (alpha * b / r), so effective forms of blocks and full adapters agree."""
    out = fit_rank(f, rank)
    for name, m in out.modules.items():
        m.alpha = f.modules[name].scaling * rank
    return out


def _fit_rows(A: torch.Tensor, r: int) -> torch.Tensor:
    if A.shape[0] >= r:
        return A[:r].clone()
    return torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], 0)


def _fit_cols(B: torch.Tensor, r: int) -> torch.Tensor:
    if B.shape[1] >= r:
        return B[:, :r].clone()
    return torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1)


# ---------------------------------------------------------------------------------------------
# same-shape averaging (FedIT, FedSA, FFA, heads): one matmul for all tensors
# ---------------------------------------------------------------------------------------------
def flatten(updates: Sequence[LoraFactors]) -> tuple[list[str], list[torch.Size], dict[str, float], list[torch.Tensor]]:
    """(keys, shapes, per-module alpha, one flat float vector per update); every update must carry
    the same tensors with the same shapes."""
    keys, shapes = check_same_tensors(updates)
    rows = [torch.cat([t.reshape(-1).float() for _, t in u.tensors()]) for u in updates]
    return keys, shapes, {n: m.alpha for n, m in updates[0].modules.items()}, rows


def check_same_tensors(updates: Sequence[LoraFactors]) -> tuple[list[str], list[torch.Size]]:
    """(keys, shapes) shared by every update; the first update that differs is named."""
    if not updates:
        raise ValueError("aggregation needs at least one update")
    first = list(updates[0].tensors())
    keys, shapes = [k for k, _ in first], [t.shape for _, t in first]
    for i, u in enumerate(updates):
        items = list(u.tensors())
        if [k for k, _ in items] != keys:
            raise ValueError(f"update {i} carries different tensors than update 0")
        if [t.shape for _, t in items] != shapes:
            raise ValueError("updates disagree on tensor shapes; use a heterogeneous-rank strategy")
    return keys, shapes


def unflatten(flat: torch.Tensor, keys: list[str], shapes: list[torch.Size], alpha: dict[str, float]) -> LoraFactors:
    """Inverse of :func:`flatten` for one vector."""
    out = LoraFactors()
    offset = 0
    for key, shape in zip(keys, shapes):
        n = shape.numel()
        t = flat[offset : offset + n].reshape(shape)
        offset += n
        if key.startswith("head/"):
            out.extras[key[5:]] = t
            continue
        module, _, part = key.rpartition("/")
        m = out.modules.setdefault(module, ModuleFactors(A=None, B=None, alpha=alpha[module]))
        setattr(m, part, t)
    return out


def weighted_mean(updates: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """Weighted mean of every tensor present in all updates (same keys and shapes).

    Vectorised: each update is flattened into one vector, each chunk of clients is reduced by one
    (1 x chunk) @ (chunk x N) product, and the result is split back. Cost is linear in K and N.
    """
    if not updates:
        raise ValueError("weighted_mean needs at least one update")
    p = normalise(weights).to(torch.float32)
    check_same_tensors(updates)  # every update, before any arithmetic
    mean = None
    # Chunks of clients bound memory (1000 updates of a 7B adapter do not fit stacked at once)
    # while each chunk is still one matmul.
    for start in range(0, len(updates), _CHUNK):
        keys, shapes, alpha, rows = flatten(list(updates[start : start + _CHUNK]))
        part = p[start : start + _CHUNK] @ torch.stack(rows)
        mean = part if mean is None else mean.add_(part)
    return unflatten(mean, keys, shapes, alpha)


# ---------------------------------------------------------------------------------------------
# HetLoRA: zero-padding with sparsity-weighted averaging
# ---------------------------------------------------------------------------------------------
def aggregate_zero_padded(
    updates_eff: Sequence[LoraFactors], weights: Sequence[float], max_rank: int, sparsity_weighted: bool = True
) -> LoraFactors:
    """HetLoRA (Cho et al., 2024): pad each client's effective A rows / B columns to ``max_rank``
    and average. With ``sparsity_weighted`` each module's client weights are proportional to
    ``weight_k * ||B_k A_k||_F`` (the paper's sparsity-weighted aggregation), normalised per module.
    """
    p = normalise(weights)
    out = LoraFactors()
    for name in updates_eff[0].modules:
        As = torch.stack([_fit_rows(u.modules[name].A, max_rank) for u in updates_eff])
        Bs = torch.stack([_fit_cols(u.modules[name].B, max_rank) for u in updates_eff])
        if sparsity_weighted:
            norms = torch.stack([_product_norm(u.modules[name].B, u.modules[name].A) for u in updates_eff]).double()
            w = p * norms
            w = p if float(w.sum()) <= 0 else w / w.sum()
        else:
            w = p
        w = w.to(As.dtype)
        out.modules[name] = ModuleFactors(
            A=torch.einsum("k,kri->ri", w, As), B=torch.einsum("k,kor->or", w, Bs), alpha=float(max_rank)
        )
    out.extras = _mean_extras(updates_eff, p)
    return out


def keep_uncovered(new_eff: LoraFactors, previous_eff: LoraFactors, covered_rank: int) -> LoraFactors:
    """Components ``covered_rank..`` of ``new_eff`` replaced by ``previous_eff``'s.

    Under partial sampling, a round whose clients all train rank <= ``covered_rank`` pads the
    higher components with zeros on both A and B, and zero A rows with zero B columns get zero
    gradient forever after: the federation silently loses that capacity. Keeping the previous
    global's components where no sampled client covers them (``hetero.hetlora_keep_uncovered``)
    preserves it; covered components follow HetLoRA's formula unchanged.
    """
    out = LoraFactors(modules=dict(new_eff.modules), extras=dict(new_eff.extras))
    for name, m in new_eff.modules.items():
        prev = previous_eff.modules.get(name)
        if prev is None or prev.A is None or prev.B is None or covered_rank >= m.rank:
            continue
        A, B = m.A.clone(), m.B.clone()
        A[covered_rank:] = _fit_rows(prev.A, m.rank)[covered_rank:]
        B[:, covered_rank:] = _fit_cols(prev.B, m.rank)[:, covered_rank:]
        out.modules[name] = ModuleFactors(A=A, B=B, alpha=m.alpha)
    return out


def _product_norm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    # ||B A||_F^2 = trace(A A^T B^T B): r x r work instead of out x in.
    return torch.sqrt(torch.clamp(torch.sum((A @ A.T) * (B.T @ B)), min=0.0))


def prune_rank(m: ModuleFactors, ratio: float) -> int:
    """HetLoRA's local rank self-pruning: the rank after dropping trailing components whose
    share of the update's norm (||B[:, i]|| * ||A[i]||, summed from the tail) stays below ``ratio``."""
    contrib = torch.linalg.vector_norm(m.B, dim=0) * torch.linalg.vector_norm(m.A, dim=1)
    total = float(contrib.sum())
    if total <= 0:
        return m.rank
    tail, r = 0.0, m.rank
    while r > 1 and (tail + float(contrib[r - 1])) / total < ratio:
        tail += float(contrib[r - 1])
        r -= 1
    return r


def prune_to_rank(f: LoraFactors, rank: int, alpha: float) -> LoraFactors:
    """Keep the first ``rank`` components of every module, with alpha ``alpha``, *keeping the update
    those components make*: B is rescaled by s_old / s_new, so (alpha/rank) * B' @ A' equals
    s_old * B[:, :rank] @ A[:rank] exactly. (Under ``alpha_mode = "fixed"`` dropping the rank raises
    the scaling alpha/r; without the rescale the pruned client's update would grow by r_old/r_new.)"""
    out = LoraFactors(extras=dict(f.extras))
    for name, m in f.modules.items():
        if m.A is None or m.B is None:
            raise ValueError(f"{name}: pruning needs both A and B")
        ratio = m.scaling / (alpha / rank)
        out.modules[name] = ModuleFactors(A=m.A[:rank].clone(), B=m.B[:, :rank] * ratio, alpha=alpha)
    return out


# ---------------------------------------------------------------------------------------------
# FLoRA: stacking
# ---------------------------------------------------------------------------------------------
def aggregate_stacked(updates_eff: Sequence[LoraFactors], weights: Sequence[float]) -> LoraFactors:
    """FLoRA (Wang et al., 2024): concatenate ``p_k * B_k`` along the rank and ``A_k`` below each
    other so that ``B_stack @ A_stack == sum_k p_k B_k A_k`` exactly; ranks may differ.
    The stacked rank is the sum of the clients' ranks."""
    p = normalise(weights).to(torch.float32)
    out = LoraFactors()
    for name in updates_eff[0].modules:
        A = torch.cat([u.modules[name].A for u in updates_eff], 0)
        B = torch.cat([float(pk) * u.modules[name].B for pk, u in zip(p, updates_eff)], 1)
        out.modules[name] = ModuleFactors(A=A, B=B, alpha=float(A.shape[0]))
    out.extras = _mean_extras(updates_eff, p.double())
    return out


def concat_rank(first: LoraFactors, second: LoraFactors) -> LoraFactors:
    """The sum of two effective adapters as one adapter of rank r1 + r2 (exact)."""
    out = LoraFactors(extras=dict(second.extras))
    for name in first.modules.keys() | second.modules.keys():
        a, b = first.modules.get(name), second.modules.get(name)
        if a is None or b is None:
            out.modules[name] = a or b
            continue
        A = torch.cat([a.A, b.A], 0)
        out.modules[name] = ModuleFactors(A=A, B=torch.cat([a.B, b.B], 1), alpha=float(A.shape[0]))
    return out


# ---------------------------------------------------------------------------------------------
# FlexLoRA: SVD of the weighted sum of products, without forming out x in matrices
# ---------------------------------------------------------------------------------------------
def low_rank_svd(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``B @ A`` (batched over a leading dim if given).

    ``B @ A`` has rank <= R = B.shape[-1], so with B = Qb Rb and A^T = Qa Ra the product is
    Qb (Rb Ra^T) Qa^T and only the R x R core needs an SVD: O((out + in) R^2 + R^3) instead of
    O(out * in * min(out, in)). Returns (B', A', S) with B' = U sqrt(S), A' = sqrt(S) V^T.
    """
    # QR in the factors' own precision (the big, out x R and in x R, part of the work); the small
    # R x R core in float64.
    Qb, Rb = torch.linalg.qr(B.float())
    Qa, Ra = torch.linalg.qr(A.float().transpose(-1, -2))
    U, S, Vh = torch.linalg.svd(Rb.double() @ Ra.double().transpose(-1, -2))
    U, S, Vh = U.float(), S.float(), Vh.float()
    k = min(rank, S.shape[-1])
    sq = torch.sqrt(S[..., :k])
    Bn = (Qb @ U[..., :, :k]) * sq.unsqueeze(-2)
    An = sq.unsqueeze(-1) * (Vh[..., :k, :] @ Qa.transpose(-1, -2))
    if k < rank:  # the product's rank is below the request: pad with zero components
        Bn = torch.cat([Bn, Bn.new_zeros(*Bn.shape[:-1], rank - k)], -1)
        An = torch.cat([An, An.new_zeros(*An.shape[:-2], rank - k, An.shape[-1])], -2)
        S = torch.cat([S, S.new_zeros(*S.shape[:-1], rank - k)], -1)
    return Bn.to(B.dtype), An.to(A.dtype), S[..., :rank]


def svd_redistribute(stacked_eff: LoraFactors, rank: int) -> LoraFactors:
    """FlexLoRA (Bai et al., 2024): the truncated SVD, at ``rank``, of each module's summed update,
    with sqrt(S) split between the two factors. Modules of equal shape are done in one batched call."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for name, m in stacked_eff.modules.items():
        groups[(tuple(m.B.shape), tuple(m.A.shape))].append(name)
    out = LoraFactors(extras=dict(stacked_eff.extras))
    for names in groups.values():
        Bs = torch.stack([stacked_eff.modules[n].B for n in names])
        As = torch.stack([stacked_eff.modules[n].A for n in names])
        Bn, An, _ = low_rank_svd(Bs, As, rank)
        for i, n in enumerate(names):
            out.modules[n] = ModuleFactors(A=An[i].contiguous(), B=Bn[i].contiguous(), alpha=float(rank))
    return out


def aggregate_svd(updates_eff: Sequence[LoraFactors], weights: Sequence[float], rank: int) -> LoraFactors:
    """FlexLoRA: weighted sum of the clients' products, redistributed by truncated SVD at ``rank``.
    Truncating the result further to r_k gives client k's best rank-r_k approximation."""
    return svd_redistribute(aggregate_stacked(updates_eff, weights), rank)


def _mean_extras(updates: Sequence[LoraFactors], p: torch.Tensor) -> dict[str, torch.Tensor]:
    if not updates[0].extras:
        return {}
    return {k: sum(float(pk) * u.extras[k] for pk, u in zip(p, updates)) for k in updates[0].extras}

"""Bounded influence: share cap, norm bound and robust averages, against hand computation."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import statistics

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedlora.factors import LoraFactors, ModuleFactors
from fedlora.robust import cap_shares, clip_update, coordinate_median, trimmed_mean, update_norm

IN, OUT = 6, 5


def _f(seed: int, rank: int = 3, alpha: float = 6.0, scale: float = 1.0) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        modules={
            "m": ModuleFactors(
                A=torch.randn(rank, IN, generator=g) * scale, B=torch.randn(OUT, rank, generator=g) * scale, alpha=alpha
            )
        },
        extras={"head.w": torch.randn(2, IN, generator=g) * scale},
    )


def test_cap_shares_water_fills_exactly():
    assert cap_shares([1, 1, 98], 0.5) == pytest.approx([0.25, 0.25, 0.5])
    assert cap_shares([1, 2, 97], 0.4) == pytest.approx([0.2, 0.4, 0.4])  # the cap cascades to the second
    assert cap_shares([10, 30, 60], 1.0) == pytest.approx([0.1, 0.3, 0.6])
    assert cap_shares([1, 1000], 0.4) == pytest.approx([0.5, 0.5])  # infeasible cap: uniform
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        cap_shares([0, 0], 0.5)


@settings(deadline=None)
@given(st.lists(st.floats(0.01, 1e12), min_size=1, max_size=20), st.floats(0.05, 1.0))
def test_cap_shares_properties(weights, cap):
    p = cap_shares(weights, cap)
    assert math.isclose(sum(p), 1.0, rel_tol=1e-9)
    if cap * len(weights) > 1:
        assert max(p) <= cap + 1e-9
        # order is kept: a client with more examples never gets less weight
        order = np.argsort(weights, kind="stable")
        assert all(p[order[i]] <= p[order[i + 1]] + 1e-12 for i in range(len(p) - 1))


def test_update_norm_is_the_effective_change_and_clip_lands_on_the_bound():
    start, new = _f(0), _f(1)
    s = 6.0 / 3
    want = math.sqrt(
        float(
            ((new.modules["m"].A - start.modules["m"].A) ** 2).sum()
            + ((s * new.modules["m"].B - s * start.modules["m"].B) ** 2).sum()
            + ((new.extras["head.w"] - start.extras["head.w"]) ** 2).sum()
        )
    )
    assert update_norm(start, new) == pytest.approx(want, rel=1e-6)
    clipped, norm = clip_update(start, new, want / 4)
    assert norm == pytest.approx(want, rel=1e-6)
    assert update_norm(start, clipped) == pytest.approx(want / 4, rel=1e-5)
    # the clipped update points the same way: start + (new - start) / 4, per tensor
    assert torch.allclose(
        clipped.modules["m"].A, start.modules["m"].A + (new.modules["m"].A - start.modules["m"].A) / 4
    )
    # ... B in effective form (scaling s on both sides), and the head: the same direction, not its reverse
    assert torch.allclose(
        s * clipped.modules["m"].B, s * start.modules["m"].B + s * (new.modules["m"].B - start.modules["m"].B) / 4
    )
    assert torch.allclose(
        clipped.extras["head.w"], start.extras["head.w"] + (new.extras["head.w"] - start.extras["head.w"]) / 4
    )
    same, _ = clip_update(start, new, want * 2)
    assert same is new  # under the bound: untouched


def test_clip_measures_a_pruned_client_on_its_kept_components_in_its_own_scale():
    start = _f(0, rank=4, alpha=8.0)
    new = LoraFactors(
        modules={
            "m": ModuleFactors(
                A=start.modules["m"].A[:3].clone(), B=start.modules["m"].B[:, :3] * (8.0 / 4) / (8.0 / 3), alpha=8.0
            )
        },
        extras=dict(start.extras),
    )
    assert update_norm(start, new) == pytest.approx(0.0, abs=1e-6)  # same update, new scaling
    # Clipped, it keeps its own rank: start's first 3 components plus a quarter of its change.
    moved = _f(5, rank=3, alpha=8.0)
    n = update_norm(start, moved)
    clipped, _ = clip_update(start, moved, n / 4)
    assert clipped.modules["m"].A.shape == (3, IN) and update_norm(start, clipped) == pytest.approx(n / 4, rel=1e-5)
    assert torch.allclose(
        clipped.modules["m"].A, start.modules["m"].A[:3] + (moved.modules["m"].A - start.modules["m"].A[:3]) / 4
    )
    # A client that shares A only (FedSA) is clipped on A and still sends no B.
    a_only = LoraFactors(modules={"m": ModuleFactors(A=moved.modules["m"].A, B=None, alpha=8.0)})
    clipped, _ = clip_update(start, a_only, 1e-3)
    assert clipped.modules["m"].B is None and update_norm(start, clipped) == pytest.approx(1e-3, rel=1e-4)


def test_median_and_trimmed_mean_resist_one_huge_client():
    honest = [_f(i) for i in range(4)]
    evil = _f(9, scale=1e6)
    med = coordinate_median(honest + [evil])
    tm = trimmed_mean(honest + [evil], 0.2)
    stack = torch.stack([h.modules["m"].A for h in honest])
    lo, hi = stack.min(0).values, stack.max(0).values
    for agg in (med, tm):
        A = agg.modules["m"].A
        assert bool(((A >= lo - 1e-6) & (A <= hi + 1e-6)).all())  # inside the honest range, coordinate-wise
    # hand computation for the trimmed mean on 5 values: drop min and max, average the middle three
    vals = torch.stack([u.extras["head.w"] for u in honest + [evil]]).sort(0).values
    assert torch.allclose(tm.extras["head.w"], vals[1:4].mean(0))
    assert torch.allclose(med.extras["head.w"], vals[2])
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_mean(honest, 0.5)


def test_boundaries_of_the_share_cap_and_the_clip():
    assert cap_shares([0, 1, 1], 0.6) == pytest.approx([0.0, 0.5, 0.5])  # a zero weight is allowed
    assert cap_shares([2, 1, 1], 0.5) == pytest.approx([0.5, 0.25, 0.25])  # exactly at the cap: untouched
    with pytest.raises(ValueError, match="non-negative"):
        cap_shares([-1, 2], 0.9)
    with pytest.raises(ValueError, match="non-negative"):
        cap_shares([], 0.9)
    start, new = _f(0), _f(1)
    n = update_norm(start, new)
    same, norm = clip_update(start, new, n)  # exactly on the bound: not scaled
    assert same is new and norm == n
    only_b = LoraFactors(modules={"m": ModuleFactors(A=None, B=new.modules["m"].B, alpha=6.0)})
    clipped, _ = clip_update(start, only_b, 1e-3)
    assert clipped.modules["m"].A is None and update_norm(start, clipped) == pytest.approx(1e-3, rel=1e-4)
    assert update_norm(start, start) == 0.0


# ---------------------------------------------------------------------------------- the round's medians
def _lin(x: LoraFactors, y: LoraFactors, c: float) -> LoraFactors:
    """x + c * (y - x), tensor by tensor."""
    return LoraFactors(
        modules={
            n: ModuleFactors(A=m.A + c * (y.modules[n].A - m.A), B=m.B + c * (y.modules[n].B - m.B), alpha=m.alpha)
            for n, m in x.modules.items()
        },
        extras={k: t + c * (y.extras[k] - t) for k, t in x.extras.items()},
    )


def _attacked_round(
    order: list[int],
    attack: dict[int, str],
    held_back: int | None = None,
    examples: list[int] | None = None,
    seen: dict | None = None,
    shared_step: float | list[float] = 0.5,
    settings: dict[str, str] | None = None,
    server_round: int = 1,
    state: dict | None = None,
    **robust: str,
):
    """One FedIT round of 10 clients through the real strategy path, replies in ``order``. Honest
    client i, over ``examples[i]`` examples (100 each by default; 1000 declared), moves from the
    start by ``shared_step`` of a shared step plus the rest of a step of its own (half each by
    default; a list: client i's own), times sqrt(examples / 100) (an honest
    AdamW client's norm grows as the square root of its steps); an attacker sends its factors x1000
    ('scale'), its change sign-flipped at 3.5x ('flip'), what it was given ('silent'), or the change of
    a ninth of the examples it reports ('claim'). ``held_back``: how many replies
    robust.held_back_mb holds. ``settings``: overrides outside ``[robust]``; ``server_round``: the round's number;
    ``state``: the strategy's checkpointed state loaded first (its extensions' part). ``seen``, when given, receives the round's start, each reply's change
    (:func:`fedlora.robust.update_change`, by client id) and the shared step's change ("reference").
    Returns (strategy, round log)."""
    from test_folds import _train_round
    from test_privacy import _Reply
    from test_strategy_maths import OUT, _local_training, _setup
    from test_strategy_maths import _reply as reply_content

    from fedlora import codec

    extra = {**(settings or {}), **{f"robust.{k}": v for k, v in robust.items()}}
    _, s, profiles, template = _setup("fedit", "fixed", [4] * 10, **extra)
    if held_back is not None:
        size = sum(t.numel() * 4 for _, t in template.select(s.sharing_policy.shared).tensors())
        _, s, profiles, template = _setup(
            "fedit", "fixed", [4] * 10, **extra, **{"robust.held_back_mb": str((held_back + 0.5) * size / 2**20)}
        )
    if state is not None:
        for e in s.extensions:
            e.load_server_state(state.get(e.name, {}))
    replies = []
    for i, prof in enumerate(profiles):
        adapter, _ = s.client_payload(prof, server_round)
        received = codec.decode(codec.encode(adapter, modules=s.module_names), alpha=prof.alpha, modules=s.module_names)
        start = LoraFactors(
            modules={
                n: ModuleFactors(A=m.A[: prof.rank].clone(), B=torch.zeros(OUT, prof.rank), alpha=prof.alpha)
                for n, m in template.modules.items()
            },
            extras={k: v.clone() for k, v in template.extras.items()},
        ).merged_with(received)
        shared = _local_training(received, prof, template, s.sharing_policy, seed=999)
        own = _local_training(received, prof, template, s.sharing_policy, seed=10 + i)
        n = examples[i] if examples else 100
        step = shared_step[i] if isinstance(shared_step, list) else shared_step
        f = _lin(start, _lin(shared, own, 1.0 - step), (n / 9 if attack.get(i) == "claim" else n) ** 0.5 / 10)
        if attack.get(i) == "scale":
            f = LoraFactors(
                modules={
                    n: ModuleFactors(A=m.A * 1e3**0.5, B=m.B * 1e3**0.5, alpha=m.alpha) for n, m in f.modules.items()
                },
                extras={k: v * 1e3 for k, v in f.extras.items()},
            )
        elif attack.get(i) == "flip":
            f = _lin(start, f, -3.5)
        elif attack.get(i) == "silent":
            f = start
        replies.append(_Reply(prof.node_id, reply_content(s, f, n, prof.rank)))
        if seen is not None:
            from fedlora.robust import update_change

            seen["start"] = start
            seen["reference"] = update_change(start, _lin(start, shared, 1.0).select(s.sharing_policy.shared))
            seen.setdefault("changes", {})[prof.client_id] = update_change(start, f.select(s.sharing_policy.shared))
    if seen is not None and "trust_examples" in robust:  # the server's update: the shared step
        from fedlora.strategies.round_log import RoundLog

        trust = next(e for e in s.extensions if e.name == "trust")
        trust.use_reference(seen["reference"], s.rounds.setdefault(1, RoundLog(server_round=1)))
    return s, _train_round(s, profiles, [replies[i] for i in order], server_round)


@pytest.mark.parametrize(
    "order", [random.Random(seed).sample(range(10), 10) for seed in range(8)] + [list(range(10))[::-1]]
)
@pytest.mark.parametrize("reject", ["10", "0"])
def test_the_relative_bound_is_the_rounds_own_median_in_any_arrival_order(order, reject):
    """Four of ten replies blown up 1000x (the attack that filled the old first-round window when they
    answered first): in every arrival order the same four are named and the new global adapter is
    the same. At the default robust.relative_norm_reject (10x the round's median size-normalised
    norm) they are left out of the fold; with it off, clipped onto 1.5x that median."""
    attackers = {0, 3, 5, 8}
    first = sorted(range(10), key=lambda i: (i not in attackers, i))  # the attackers answer first
    attack = dict.fromkeys(attackers, "scale")
    ref, ref_rl = _attacked_round(first, attack, relative_norm_reject=reject)
    s, rl = _attacked_round(list(order), attack, relative_norm_reject=reject)
    named = [f"client c{i}" for i in sorted(attackers)]
    for log in (ref_rl, rl):
        assert not log.flagged
        if reject == "0":
            assert sorted(c.split(":")[0] for c in log.clipped) == named, log.clipped
            assert all("(1.5x)" in c and "median update norm / examples^0.5" in c for c in log.clipped), log.clipped
            assert not log.rejected
        else:
            assert sorted(c.split(" (node")[0] for c in log.rejected) == named, log.rejected
            assert all("robust.relative_norm_reject (10x): left out of the fold" in c for c in log.rejected)
            assert not log.clipped
    assert rl.accepted == (10 if reject == "0" else 6)
    for (k, a), (_, b) in zip(s.global_eff.tensors(), ref.global_eff.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    if reject != "0":  # left out: the round is that of the six honest clients alone
        honest, _ = _attacked_round([i for i in order if i not in attackers], {}, relative_norm_reject=reject)
        for (k, a), (_, b) in zip(s.global_eff.tensors(), honest.global_eff.tensors()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=20))
def test_the_rounds_median_is_the_middle_value_or_the_mean_of_the_middle_two(xs):
    from fedlora.robust import median as _median

    assert _median(xs) == pytest.approx(statistics.median(xs), rel=1e-12)
    assert _median(list(reversed(xs))) == _median(xs)


@pytest.mark.parametrize("n", [400, 1])
def test_a_clipped_reply_is_held_to_the_bound_times_its_size_and_named_with_its_figures(n):
    """A client sign-flipped at 3.5x its change, over n examples among clients of 100: its line
    gives its norm, its examples, its ratio to the round's median normalised norm and the limit
    it was clipped to, and they agree: norm = ratio x median x sqrt(n); limit = 1.5 x median x
    sqrt(n) (one example counts as one). With robust.norm_action = "reject" the same client is
    left out, named with the relative bound."""
    sizes = [100] * 10
    sizes[4] = n
    _, rl = _attacked_round(list(range(10)), {4: "flip"}, examples=sizes)
    (line,) = rl.clipped
    m = re.search(
        rf"update norm ([0-9.e+-]+) over {n} examples is ([0-9.e+-]+)x the round's median "
        r"update norm / examples\^0.5 ([0-9.e+-]+), above robust.relative_norm_bound \(1.5x\); clipped to ([0-9.e+-]+)",
        line,
    )
    assert m, line
    norm, ratio, ref, limit = (float(g) for g in m.groups())
    root = n**0.5
    assert norm == pytest.approx(ratio * ref * root, rel=2e-3) and limit == pytest.approx(1.5 * ref * root, rel=2e-3)
    _, rejected = _attacked_round(list(range(10)), {4: "flip"}, examples=sizes, norm_action='"reject"')
    assert not rejected.clipped and rejected.accepted == 9
    assert [c.split(" (node")[0] for c in rejected.rejected] == ["client c4"]
    assert "above robust.relative_norm_bound (1.5x)" in rejected.rejected[0]
    assert "relative_norm_reject" not in rejected.rejected[0]


@pytest.mark.parametrize("action", ["clip", "reject"])
@pytest.mark.parametrize("examples", [100, 1])
def test_the_absolute_bound_cuts_only_the_replies_above_it(action, examples):
    """robust.update_norm_bound at 3x the largest honest update norm (the relative bounds off), with
    honest norms whose bound lies above 1 (100 examples each) and below it (1 each): the x1000
    client is clipped onto it (named with both figures) or, with norm_action = "reject", left out
    and named; the honest nine are folded untouched."""
    seen: dict = {}
    sizes = [examples] * 10
    _attacked_round(list(range(10)), {4: "scale"}, examples=sizes, seen=seen, relative_norm_bound="0")
    honest = max(float(c.norm()) for cid, c in seen["changes"].items() if cid != "c4")
    bound = 3 * honest
    assert (bound > 1) == (examples == 100)
    s, rl = _attacked_round(
        list(range(10)),
        {4: "scale"},
        examples=sizes,
        relative_norm_bound="0",
        update_norm_bound=f"{bound!r}",
        norm_action=f'"{action}"',
    )
    assert float(seen["changes"]["c4"].norm()) > 10 * bound  # the attacker is far above it
    assert not any("c4" not in x for x in rl.clipped + rl.rejected)
    if action == "clip":
        assert [c.split(":")[0] for c in rl.clipped] == ["client c4"] and not rl.rejected and rl.accepted == 10
        assert rl.clipped[0].endswith(f"clipped to {bound:g}"), rl.clipped
    else:
        assert not rl.clipped and rl.accepted == 9 and len(rl.rejected) == 1
        assert "client c4" in rl.rejected[0] and f"above robust.update_norm_bound ({bound:g})" in rl.rejected[0]


def test_a_coordinate_statistic_over_more_replies_than_its_budget_is_refused_before_the_run():
    """robust.aggregation = "median" holds every reply of a round: a run whose cohort x adapter size is
    over robust.held_updates_budget_mb is refused when the strategy is built, naming both figures."""
    from test_strategy_maths import _setup

    from fedlora.schema import ConfigError

    with pytest.raises(ConfigError, match=r"median holds every reply of a round, 3 clients x .* MiB = .* MiB, above"):
        _setup("fedit", "fixed", [4] * 3, **{"robust.aggregation": '"median"', "robust.held_updates_budget_mb": "1e-9"})
    _setup("fedit", "fixed", [4] * 3, **{"robust.aggregation": '"median"'})  # within the default budget


def test_plain_norms_compare_without_the_weight_from_norm():
    """robust.norm_size_power = 0 (plain norms): a silent client (its change is zero) keeps its
    declared weight, since no example count follows from a plain norm, and nobody is named."""
    s, rl = _attacked_round(list(range(10)), {2: "silent"}, norm_size_power="0")
    assert not rl.clipped and not rl.rejected and not rl.flagged and rl.accepted == 10
    _, flip = _attacked_round(list(range(10)), {4: "flip"}, norm_size_power="0", min_cosine="-1")
    (line,) = flip.clipped  # a plain norm: no examples in the figure
    assert re.fullmatch(
        r"client c4: update norm [0-9.e+-]+ is [0-9.e+-]+x the round's median update norm [0-9.e+-]+, above "
        r"robust.relative_norm_bound \(1.5x\); clipped to [0-9.e+-]+",
        line,
    ), line


def test_the_reject_bound_leaves_out_exactly_the_replies_above_it():
    """One client sign-flipped at 3.5x its change: with robust.relative_norm_reject just above its
    ratio to the round's median it is clipped onto 1.5x; just below, left out and named with the
    same ratio; the honest nine are folded either way."""
    _, rl = _attacked_round(list(range(10)), {4: "flip"}, min_cosine="-1")  # the direction bound would cut it too
    (line,) = rl.clipped
    ratio = float(re.search(r"is ([0-9.e+-]+)x the round's median", line).group(1))
    assert 2.0 < ratio < 10.0, line
    _, above = _attacked_round(list(range(10)), {4: "flip"}, relative_norm_reject=str(ratio * 1.01), min_cosine="-1")
    assert [c.split(":")[0] for c in above.clipped] == ["client c4"] and not above.rejected and above.accepted == 10
    _, below = _attacked_round(list(range(10)), {4: "flip"}, relative_norm_reject=str(ratio * 0.99), min_cosine="-1")
    assert not below.clipped and below.accepted == 9, below.clipped
    assert [c.split(" (node")[0] for c in below.rejected] == ["client c4"] and f"is {ratio:.3g}x" in below.rejected[0]


def _load_round_helpers() -> None:
    """Import the modules _attacked_round draws on once, outside any @given (they define tests of their own)."""
    import test_folds  # noqa: F401
    import test_privacy  # noqa: F401
    import test_strategy_maths  # noqa: F401


_load_round_helpers()


@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_bounds_and_weights_are_the_same_in_any_arrival_order_and_cut_only_the_liars(data):
    """Clients of 10-1000 examples; up to four of ten lie (blown up, sign-flipped at 3.5x, silent, or
    claiming nine times the examples their change shows): in any arrival order the same clients are
    named, each with the same figure, and the new global adapter is the same; every liar is named.
    No honest client is left out or clipped; one may have its weight held under the round's median when
    flips that outweigh the honest clients around them (three of 42 examples among clients of 10)
    turn its cosine below robust.min_cosine and widen the round's spread enough to keep themselves."""
    sizes = data.draw(st.lists(st.integers(10, 1000), min_size=10, max_size=10), label="examples")
    liars = data.draw(st.lists(st.integers(0, 9), max_size=4, unique=True), label="liars")
    attack = {i: data.draw(st.sampled_from(["scale", "flip", "silent", "claim"]), label=f"lie {i}") for i in liars}
    order = data.draw(st.permutations(range(10)), label="order")
    ref, ref_rl = _attacked_round(list(range(10)), attack, examples=sizes)
    s, rl = _attacked_round(list(order), attack, examples=sizes)
    assert sorted(rl.clipped) == sorted(ref_rl.clipped) and sorted(rl.rejected) == sorted(ref_rl.rejected)
    assert not rl.flagged
    named = {c.split(":")[0] for c in rl.clipped} | {c.split(" (node")[0] for c in rl.rejected}
    assert named >= {f"client c{i}" for i in liars}, (rl.clipped, rl.rejected)
    honest = [c for c in rl.clipped + rl.rejected if not any(c.startswith(f"client c{i}:") for i in liars)]
    honest = [c for c in honest if not any(c.startswith(f"client c{i} ") for i in liars)]
    assert all("kept only by robust.cosine_spread" in c for c in honest), honest
    assert not honest or sum(k == "flip" for k in attack.values()) >= 2, honest
    for i, kind in attack.items():
        line = next(
            c for c in rl.clipped + rl.rejected if c.startswith(f"client c{i}:") or c.startswith(f"client c{i} ")
        )
        if kind == "scale":  # 1000x: far beyond the bound, left out
            assert "robust.relative_norm_reject (10x): left out of the fold" in line, line
        elif kind in ("silent", "claim"):  # the weight its norm supports: n x (ratio x 1.5)^2, ratio 0 or about 1/3
            cut = float(re.search(r"cut to ([0-9.e+-]+):", line).group(1))
            ratio = float(re.search(r"examples\^0.5 is ([0-9.e+-]+)x", line).group(1))
            assert ratio == (0.0 if kind == "silent" else pytest.approx(1 / 3, rel=0.3)), line
            assert cut == pytest.approx(sizes[i] * (ratio * 1.5) ** 2, rel=0.01, abs=1e-6), line
        else:  # clipped onto the bound, then left out for pointing away from the others or held to the median
            assert "above robust.relative_norm_bound (1.5x); clipped to" in line
            assert any(c.startswith(f"client c{i} ") and "update direction has cosine -" in c for c in rl.rejected) or (
                any(
                    c.startswith(f"client c{i}: weight ") and "kept only by robust.cosine_spread" in c
                    for c in rl.clipped
                )
                or sizes[i] <= sorted(sizes)[5]  # not above the median weight: nothing to hold
            ), (rl.rejected, rl.clipped)
    for (k, a), (_, b) in zip(s.global_eff.tensors(), ref.global_eff.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


def test_silent_replies_folded_before_the_round_ends_are_counted_when_their_weight_could_not_be_checked():
    """Two silent clients (they send back what they were given) while only two replies are held back:
    the held set keeps the largest norms, so the silent ones are folded early at their declared
    weight, and the round says how many; with the whole round held, each is cut to weight 0 and named."""
    _, rl = _attacked_round(list(range(10)), {0: "silent", 1: "silent"}, held_back=2, min_cosine="-1")
    assert rl.flagged == [
        "2 replies below 1/1.5 of the round's median update norm / examples^0.5 folded at their declared weight "
        "(robust.weight_from_norm): the round's replies exceed robust.held_back_mb (2 replies)"
    ], rl.flagged
    _, whole = _attacked_round(list(range(10)), {0: "silent", 1: "silent"})
    assert sorted(c.split(":")[0] for c in whole.clipped) == ["client c0", "client c1"] and not whole.flagged
    assert all("cut to 0:" in c and "(robust.weight_from_norm)" in c for c in whole.clipped), whole.clipped
    assert all(
        c.endswith(
            "below 1/robust.relative_norm_bound (0.667x), so its update supports no more (robust.weight_from_norm)"
        )
        for c in whole.clipped
    ), whole.clipped
    _, tight = _attacked_round(list(range(10)), {0: "silent"}, relative_norm_bound="1", min_cosine="-1")
    assert any(c.startswith("client c0: weight 100 examples cut to 0:") for c in tight.clipped), tight.clipped
    _, unweighed = _attacked_round(
        list(range(10)), {0: "silent", 1: "silent"}, held_back=2, min_cosine="-1", weight_from_norm="false"
    )
    assert not unweighed.flagged and not unweighed.clipped, unweighed.flagged


@settings(max_examples=40, deadline=None)
@given(
    honest=st.lists(st.integers(1, 5000), min_size=3, max_size=12),
    liars=st.integers(1, 5),
    claim=st.integers(1, 10**7),
    factor=st.sampled_from([1.0, 2.0, 4.0, 10.0]),
)
def test_a_group_at_the_weight_cap_holds_no_more_than_the_documented_share(honest, liars, claim, factor):
    """robust.max_weight_factor through the real WeightCap over a federation's declared sizes: k
    clients that all declare ``claim`` examples hold at most k f / (k f + the others' capped weight in
    medians) of the round's weight, as its help says, and an honest client at or under the cap keeps
    its count."""
    from fedlora.aggregation.bound import WeightCap
    from fedlora.protocol import NodeProfile
    from fedlora.strategies.round_log import RoundLog

    cfg, s, _, _ = _setup_weights(factor)
    sizes = honest + [claim] * liars
    s.profiles = {
        100 + i: NodeProfile(
            node_id=100 + i, client_id=f"c{i}", partition_id=i, rank=4, alpha=8.0, num_train=n, num_test=1
        )
        for i, n in enumerate(sizes)
    }
    median = sorted(sizes)[len(sizes) // 2]
    cap, rl = WeightCap(), RoundLog(server_round=1)
    weights = [cap(s, s.profiles[100 + i], n, rl) for i, n in enumerate(sizes)]
    for n, w in zip(sizes, weights):
        assert w == (n if n <= factor * median else factor * median)
    group = sum(weights[len(honest) :]) / sum(weights)
    others = sum(weights[: len(honest)]) / median
    assert group <= liars * factor / (liars * factor + others) + 1e-12
    assert len(rl.clipped) == sum(n > factor * median for n in sizes)


def _setup_weights(factor: float):
    from test_strategy_maths import _setup

    return _setup("fedit", "fixed", [4] * 3, **{"robust.max_weight_factor": str(factor)})


def test_more_replies_above_the_bound_than_it_holds_back_are_named_as_folded_unbounded():
    """Four blown-up replies, two held back: in either arrival order the two largest are bounded (left
    out, far beyond it: robust.relative_norm_reject) and the round says that two more were folded before the bound was known, and that the direction
    was not checked."""
    attack = dict.fromkeys((0, 1, 2, 3), "scale")
    for order in ([4, 5, 6, 7, 8, 9, 0, 1, 2, 3], list(range(10))):
        _, rl = _attacked_round(order, attack, held_back=2, min_cosine="0")
        assert len(rl.rejected) == 2 and not rl.clipped and len(rl.flagged) == 2, (rl.rejected, rl.flagged)
        assert rl.flagged[0].startswith(
            "2 replies above robust.relative_norm_bound (1.5x the round's median update norm / examples^0.5 "
        )
        assert rl.flagged[0].endswith(
            "folded unbounded: more replies exceeded it than robust.held_back_mb (2 replies) holds back"
        )
        assert rl.flagged[1] == (
            "direction not checked (robust.min_cosine): the round's 10 replies exceed robust.held_back_mb (2 replies)"
        )
    _, fits = _attacked_round(list(range(10)), {0: "scale", 1: "scale"}, held_back=2, min_cosine="-1")
    assert len(fits.rejected) == 2 and not fits.flagged
    # A budget under one reply still holds one: of two flips at 3.5x (above the bound, under the
    # reject bound), one is clipped and one was folded before the bound was known.
    _, one = _attacked_round([0, 1, *range(2, 10)], {0: "flip", 1: "flip"}, held_back=0, min_cosine="-1")
    assert len(one.clipped) == 1 and not one.rejected and one.accepted == 10, one.clipped
    assert one.flagged == [
        "1 reply above robust.relative_norm_bound (1.5x the round's median update norm / examples^0.5 "
        + re.search(r"median update norm / examples\^0.5 ([0-9.e+-]+)", one.clipped[0]).group(1)
        + ") folded unbounded: more replies exceeded it than robust.held_back_mb (1 reply) holds back"
    ], one.flagged


@pytest.mark.parametrize("attackers", [{4}, {1, 5, 9}, {0, 1, 2, 3}])
def test_by_default_sign_flipped_updates_are_cut_and_the_round_is_the_honest_clients_alone(attackers):
    """Honest updates that share a direction; attackers inside the norm bound (3.5x, under a 4x bound):
    the flipped updates point away from the sum of the others' directions and are left out, named
    with their cosine; no honest client is; the global adapter is the honest clients' own round. Four
    flips at 3.5x outweigh the six honest updates' mass, but each update counts as its direction, so
    the six still set the reference."""
    honest = [i for i in range(10) if i not in attackers]
    s, rl = _attacked_round(list(range(10)), dict.fromkeys(attackers, "flip"), relative_norm_bound="4")
    ref, ref_rl = _attacked_round(honest, {}, relative_norm_bound="4")
    cut = sorted(x.split(" (node")[0] for x in rl.rejected)
    assert cut == [f"client c{i}" for i in sorted(attackers)], rl.rejected
    assert all(
        "update direction has cosine -" in x
        and "with the sum of the round's other kept update directions, below robust.min_cosine (-0.1)" in x
        for x in rl.rejected
    )
    assert rl.accepted == ref_rl.accepted == len(honest) and not rl.clipped
    assert not any("direction" in x for x in ref_rl.rejected), ref_rl.rejected
    cosines = rl.figures["direction-cosines"]  # every reply's, before any cut, and the round's floor
    assert sorted(cosines) == [f"c{i}" for i in range(10)] and rl.figures["direction-floor"] == -0.1
    assert all((cosines[f"c{i}"] < -0.1) == (i in attackers) for i in range(10)), cosines
    for (k, a), (_, b) in zip(s.global_eff.tensors(), ref.global_eff.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    off, off_rl = _attacked_round(
        list(range(10)), dict.fromkeys(attackers, "flip"), relative_norm_bound="4", min_cosine="-1"
    )
    assert not off_rl.rejected and off_rl.accepted == 10  # -1: the check is off


def test_the_cosine_floor_is_min_cosine_unless_the_rounds_cosines_scatter_wider():
    from fedlora.robust import cosine_floor

    agree = [0.2, 0.25, 0.3, 0.22, 0.28, -0.2]  # five that share a direction, one flipped
    assert cosine_floor(agree, -0.1, 2.0) == -0.1  # median 0.235, MAD 0.035: 2 deviations lie at 0.13
    scatter = [0.3, -0.2, 0.1, -0.18, 0.05, 0.2]  # no shared direction: median 0.075, MAD 0.175
    assert cosine_floor(scatter, -0.1, 2.0) == pytest.approx(0.075 - 2 * 1.4826 * 0.175)
    assert cosine_floor(scatter, -0.1, 0.0) == -0.1 and cosine_floor([], -0.1, 2.0) == -0.1
    assert cosine_floor([-0.5, -0.4, -0.3], -0.1, 0.0) == -0.1  # spread 0: min_cosine alone, not the median


@given(
    floor=st.floats(-1.0, -0.1, exclude_max=True),
    min_cosine=st.floats(-0.5, 0.5),
    a=st.floats(-1.0, 1.0),
    b=st.floats(-1.0, 1.0),
)
def test_the_spread_share_falls_continuously_from_one_at_min_cosine_to_zero_at_the_floor(floor, min_cosine, a, b):
    from fedlora.robust import spread_share

    assume(floor < min_cosine)
    lo, hi = sorted((a, b))
    share = spread_share
    assert 0.0 <= share(lo, floor, min_cosine) <= share(hi, floor, min_cosine) <= 1.0  # monotone, in [0, 1]
    assert share(floor, floor, min_cosine) == 0.0 and share(min_cosine, floor, min_cosine) == 1.0
    assert share(lo, floor, min_cosine) == (
        0.0 if lo < floor else 1.0 if lo >= min_cosine else pytest.approx((lo - floor) / (min_cosine - floor))
    )
    # Lipschitz: no step for a reply to sit on either side of
    assert abs(share(hi, floor, min_cosine) - share(lo, floor, min_cosine)) <= (hi - lo) / (min_cosine - floor) + 1e-12


def test_honest_updates_without_a_shared_direction_are_not_cut():
    """Ten honest clients whose changes are their own alone (no shared step: what a model that has
    not learned anything yet sends): their cosines with the others scatter around 0 and some fall
    below robust.min_cosine, but not below the round's spread, so none is cut (left out); with
    robust.cosine_spread 0 some are. The one furthest below min_cosine (c3) is weighed down to its
    share of the median's weight and named; over fewer examples than that share, it is left as it is."""
    _, rl = _attacked_round(list(range(10)), {}, shared_step=0.0)
    assert not rl.rejected and rl.accepted == 10
    assert [c.split(":")[0] for c in rl.clipped] == ["client c3"] and rl.figures["direction-cosines"]["c3"] < -0.1
    _, small = _attacked_round(
        list(range(10)), {}, shared_step=0.0, examples=[20 if i == 3 else 100 for i in range(10)]
    )
    assert small.figures["direction-cosines"]["c3"] < -0.1 and not small.clipped and not small.rejected, small.clipped
    _, alone = _attacked_round(list(range(10)), {}, shared_step=0.0, cosine_spread="0")
    assert any("below robust.min_cosine (-0.1)" in x for x in alone.rejected), alone.rejected


def test_a_flip_the_spread_keeps_buys_nothing_with_a_size_claim():
    """A round whose honest cosines scatter (each client shares a different part of the common step):
    client 3 flips its change and claims 3.8x the others' examples. Its cosine, -0.13, is below
    robust.min_cosine but within the round's spread, so it is kept, at the median's weight times
    its cosine's place between the round's floor and min_cosine, clipped to the norm bound for that
    weight, named: the round is the same flip's without the claim. Honest, the same client at 3.8x keeps its weight and no one is named."""
    steps = [0.0, 0.0, 0.05, 0.25, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    big = [380 if i == 3 else 100 for i in range(10)]
    s, rl = _attacked_round(list(range(10)), {3: "flip"}, examples=big, shared_step=steps)
    assert not rl.rejected and rl.accepted == 10
    assert -0.1 > rl.figures["direction-cosines"]["c3"] > rl.figures["direction-floor"]
    assert [x.split(":")[0] for x in rl.clipped] == ["client c3", "client c3"], rl.clipped
    cos, floor = rl.figures["direction-cosines"]["c3"], rl.figures["direction-floor"]
    cut = float(re.search(r"^client c3: weight 380 examples cut to ([0-9.e+-]+): its update ", rl.clipped[1]).group(1))
    assert cut == pytest.approx(100 * (cos - floor) / (-0.1 - floor), rel=1e-3) and cut < 100, rl.clipped
    assert (
        "below robust.min_cosine (-0.1), and is kept only by robust.cosine_spread (the round's floor" in rl.clipped[1]
    )
    assert rl.clipped[1].endswith("the norm bound at that weight"), rl.clipped
    no_claim, _ = _attacked_round(list(range(10)), {3: "flip"}, shared_step=steps)
    for (k, a), (_, b) in zip(s.global_eff.tensors(), no_claim.global_eff.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    _, honest = _attacked_round(list(range(10)), {}, examples=big, shared_step=steps)
    assert not honest.rejected and not honest.clipped and honest.accepted == 10


def test_colluders_that_widen_the_spread_are_kept_at_a_share_of_the_median_weight():
    """The limit of the spread condition: three flips of 42 examples among honest clients of 10 to 42
    pull the others' reference, so their cosines (about -0.5) set a median absolute deviation wide
    enough to keep them. They are not left out, but each is held to the round's median weight times
    its cosine's place between the floor and min_cosine (a small share: they sit near the floor they
    set), clipped to the norm bound at that weight, and named; so is any client whose cosine they
    turn below min_cosine. Every one of them is on robust.direction_probation for the next rounds."""
    sizes = [42, 42, 42, 42, 10, 15, 10, 10, 10, 42]
    s, rl = _attacked_round(list(range(10)), dict.fromkeys((0, 1, 2), "flip"), examples=sizes)
    assert not rl.rejected and rl.figures["direction-floor"] < -0.5
    held = [c for c in rl.clipped if "kept only by robust.cosine_spread" in c]
    assert {c.split(":")[0] for c in held} >= {"client c0", "client c1", "client c2"}, rl.clipped
    floor = rl.figures["direction-floor"]
    for c in held:
        who, cut = re.search(r"^client (c[0-9]+): weight [0-9.]+ examples cut to ([0-9.e+-]+):", c).groups()
        ramp = (rl.figures["direction-cosines"][who] - floor) / (-0.1 - floor)
        assert float(cut) == pytest.approx(28.5 * ramp, rel=1e-3), c
        assert who not in ("c0", "c1", "c2") or c.endswith("the norm bound at that weight"), c
    below = {c.split(":")[0].removeprefix("client ") for c in held}
    assert s.state_dict()[1]["extensions"]["robust"] == {"direction-below-min-cosine": dict.fromkeys(below, 1)}


def test_the_ramp_measures_a_kept_reply_against_the_floor_of_the_last_pass():
    """Seven replies, three flipped: cutting the lowest changes the others' cosines and widens their
    spread, so a flip below the first pass's floor lies above the last pass's and is kept by the
    spread. Its share of the median's say is its place between that last floor and min_cosine (a
    small one), and it is named so; it is not taken for a reply that only the quorum keeps."""
    sizes = [200, 10, 100, 42, 10, 200, 200, 100, 100, 100]
    steps = [0.1, 0.5, 0.3, 0.0, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5]
    _, rl = _attacked_round(list(range(7)), dict.fromkeys((0, 1, 5), "flip"), examples=sizes, shared_step=steps)
    line = next(c for c in rl.clipped if c.startswith("client c1: weight 10 examples cut to "))
    cos, floor, share = (
        float(x)
        for x in re.search(
            r"has cosine ([-0-9.e]+) .* robust.cosine_spread \(the round's floor ([-0-9.e]+)\), at ([0-9.e-]+) of", line
        ).groups()
    )
    assert floor < cos < rl.figures["direction-floor"], (line, rl.figures)
    assert share == pytest.approx((cos - floor) / (-0.1 - floor), abs=0.01) and share < 0.2, line
    # The flip cut first is named with the floor the spread set, not robust.min_cosine.
    (cut,) = [x for x in rl.rejected if "update direction" in x]
    first = rl.figures["direction-floor"]
    assert f"below {first:.3g}, the round's median cosine less robust.cosine_spread (2.5) deviations" in cut, cut
    # A share only ever lowers a weight: a reply already under its share of the median is left as it is.
    for c in rl.clipped:
        if m := re.search(r"weight ([0-9.e+-]+) examples cut to ([0-9.e+-]+): its update direction", c):
            assert float(m.group(2)) < float(m.group(1)), c


def test_a_flip_the_quorum_keeps_is_held_to_the_median_weight():
    """Five replies, two flipped over 200 examples, robust.cosine_spread 0: the lower flip is cut; four
    would then remain, under the quorum, so the other is kept, at the median's weight, and named so."""
    five = ([0, 1, 2, 3, 4], {3: "flip", 4: "flip"})
    quorum = {"examples": [100, 100, 100, 200, 200] + [100] * 5, "cosine_spread": "0"}
    _, rl = _attacked_round(*five, **quorum)
    assert len([x for x in rl.rejected if "update direction" in x]) == 1 and rl.accepted == 4
    held = [c for c in rl.clipped if "is kept: 5 must remain; at the median's say" in c]
    assert len(held) == 1 and held[0].split(":")[1] == " weight 200 examples cut to 100", held
    assert {held[0].split(":")[0], rl.rejected[0].split(" (node")[0]} == {"client c3", "client c4"}
    # With the norm bound at 1x the round's median, the held flip is clipped to the bound at its new weight.
    _, tight = _attacked_round(*five, **quorum, relative_norm_bound="1")
    (line,) = [c for c in tight.clipped if "is kept: 5 must remain" in c]
    assert line.endswith("the norm bound at that weight"), line


def test_the_direction_is_checked_from_five_replies():
    """Four replies give no estimate of the cosines' spread: a flip among them is clipped, not cut;
    among five it is cut."""
    _, four = _attacked_round([0, 1, 2, 3], {3: "flip"})
    assert not any("update direction" in x for x in four.rejected) and four.accepted == 4
    _, five = _attacked_round([0, 1, 2, 3, 4], {3: "flip"})
    assert [x.split(" (node")[0] for x in five.rejected if "update direction" in x] == ["client c3"]


def test_colluders_that_also_claim_size_do_not_turn_the_direction_reference():
    """Three of ten flip their change and claim 3.8x the others' examples (under the 4x weight cap,
    their flips scaled to keep their size-normalised norm at the bound): weighed by their claims
    and norms they would outweigh the seven honest updates' sum; each direction weighs at most the
    median's examples, so the seven still set it, the three are cut and no honest client is."""
    liars = (1, 4, 7)
    examples = [380 if i in liars else 100 for i in range(10)]
    s, rl = _attacked_round(list(range(10)), dict.fromkeys(liars, "flip"), examples=examples)
    cut = sorted(x.split(" (node")[0] for x in rl.rejected if "update direction" in x)
    assert cut == [f"client c{i}" for i in liars], rl.rejected
    assert rl.accepted == 7


def test_a_round_of_mixed_ranks_says_the_direction_was_not_checked():
    from test_folds import _replies, _train_round
    from test_strategy_maths import _setup

    _, het, profiles, template = _setup("hetlora", "fixed", [2, 4, 4, 4, 2])  # two ranks are enough
    rl = _train_round(het, profiles, _replies(het, profiles, template, 1, [10, 20, 30, 40, 50]), 1)
    assert rl.accepted == 5 and not rl.rejected
    assert rl.flagged == ["direction not checked (robust.min_cosine): the round's replies are of different ranks"]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 9),
    length=st.integers(1, 40),
    chunk=st.integers(1, 16),
    data=st.data(),
)
def test_cosines_to_others_are_each_changes_cosine_with_the_weighted_sum_of_the_others(seed, n, length, chunk, data):
    from fedlora.robust import cosines_to_others, gram_matrix

    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(n, length))
    w = rng.uniform(0.1, 5.0, size=n)
    members = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1)))
    gram = gram_matrix([torch.tensor(x, dtype=torch.float32) for x in xs], chunk=chunk)
    x32 = xs.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(gram.numpy(), x32 @ x32.T, rtol=1e-9, atol=1e-9)
    got = cosines_to_others(gram, list(w), members)
    assert sorted(got) == members
    for i in members:
        others = sum(w[j] * x32[j] for j in members if j != i)
        if len(members) == 1:
            assert got[i] == 1.0  # nothing else: no direction to compare with
            continue
        want = float(x32[i] @ others / (np.linalg.norm(x32[i]) * np.linalg.norm(others)))
        assert got[i] == pytest.approx(want, abs=1e-6)
    x = torch.tensor(xs[0], dtype=torch.float32)
    zero = gram_matrix([torch.zeros(length), x, x])
    assert cosines_to_others(zero, [1.0, 1.0, 1.0], [0, 1, 2])[0] == 1.0  # a zero change has no direction
    cancel = gram_matrix([x, x, -x])
    assert cosines_to_others(cancel, [1.0, 1.0, 1.0], [0, 1, 2])[0] == 1.0  # nor a sum of others that cancels
    with pytest.raises(ValueError, match="^gram_matrix needs changes of one length$"):
        gram_matrix([torch.zeros(2), torch.zeros(3)])


def _drop_opposed_by_hand(
    xs: np.ndarray, w: np.ndarray, threshold: float, spread: float, held_to: dict[int, float]
) -> list[int]:
    members, dropped = list(range(len(xs))), []
    while len(members) >= 3:
        cos = {}
        for i in members:
            others = sum(w[j] * xs[j] for j in members if j != i)
            cos[i] = float(xs[i] @ others / (np.linalg.norm(xs[i]) * np.linalg.norm(others)))
        values = np.array([cos[i] for i in members])
        mad = float(np.median(np.abs(values - np.median(values))))
        floor = min(threshold, float(np.median(values)) - spread * 1.4826 * mad) if spread else threshold
        below = [i for i in members if cos[i] < max(floor, held_to.get(i, floor))]
        if not below:
            break
        worst = min(below, key=lambda i: cos[i])
        dropped.append(worst)
        members.remove(worst)
    return dropped


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    honest=st.integers(2, 8),
    flipped=st.integers(0, 4),
    threshold=st.sampled_from([-0.05, 0.0, -0.2]),
    spread=st.sampled_from([0.0, 1.0, 2.0]),
    held=st.sets(st.integers(0, 11), max_size=3),
    held_cosine=st.sampled_from([0.0, 0.1]),
)
def test_drop_opposed_cuts_the_lowest_first_and_retakes_the_cosines_in_any_listing_order(
    seed, honest, flipped, threshold, spread, held, held_cosine
):
    """Honest changes that share a direction plus their own; flipped ones are honest changes negated
    and scaled; some (``held``) are held to a higher floor of their own. What is dropped is what
    recomputing every cosine by hand after each cut drops, and the same changes listed in another
    order drop the same changes."""
    from fedlora.robust import cosine_floor, cosines_to_others, drop_opposed, gram_matrix

    rng = np.random.default_rng(seed)
    shared = rng.normal(size=30)
    xs = [0.5 * shared + rng.normal(size=30) for _ in range(honest)]
    xs += [-rng.uniform(1, 4) * (0.5 * shared + rng.normal(size=30)) for _ in range(flipped)]
    xs = np.array(xs, dtype=np.float32).astype(np.float64)
    w = 1.0 / np.linalg.norm(xs, axis=1)
    gram = gram_matrix([torch.tensor(x) for x in xs])
    held_to = {i: held_cosine for i in held if i < len(xs)}
    opposed = drop_opposed(gram, list(w), threshold, spread, held_to=held_to)
    kept, dropped, first, first_floor, last = opposed.kept, *opposed[:4]
    assert first == cosines_to_others(gram, list(w), range(len(xs)))  # the first pass, before any cut
    assert first_floor == cosine_floor(list(first.values()), threshold, spread)
    assert last == cosines_to_others(gram, list(w), kept)  # the kept ones' cosines after the last cut
    assert opposed.last_floor == cosine_floor(list(last.values()), threshold, spread)  # and the floor they set
    assert [i for i, _, _ in dropped] == _drop_opposed_by_hand(xs, w, threshold, spread, held_to)
    assert kept == sorted(set(range(len(xs))) - {i for i, _, _ in dropped})
    assert all(c < floor <= max(threshold, held_to.get(i, threshold)) for i, c, floor in dropped)
    assert all(floor == held_cosine for i, _, floor in dropped if i in held_to and held_cosine > threshold)
    perm = rng.permutation(len(xs))
    back = {int(p): k for k, p in enumerate(perm)}  # original index -> its place in the new listing
    again = drop_opposed(
        gram_matrix([torch.tensor(xs[p]) for p in perm]),
        list(w[perm]),
        threshold,
        spread,
        held_to={back[i]: c for i, c in held_to.items()},
    ).dropped
    assert sorted(int(perm[i]) for i, _, _ in again) == sorted(i for i, _, _ in dropped)
    for (i, c, f), (j, d, g) in zip(sorted(dropped), sorted((int(perm[j]), d, g) for j, d, g in again)):
        assert i == j and c == pytest.approx(d, abs=1e-9) and f == pytest.approx(g, abs=1e-9)


def test_direction_weights_count_each_change_as_its_direction_capped_at_the_median_size():
    from fedlora.robust import direction_weights, gram_matrix

    changes = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), torch.zeros(2)]
    got = direction_weights([10.0, 40.0, 20.0], gram_matrix(changes))  # median 20
    assert got == pytest.approx([10.0 / 5.0, 20.0 / 2.0, 0.0])


def test_drop_opposed_stops_at_two_and_keeps_what_agrees():
    from fedlora.robust import drop_opposed, gram_matrix

    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    two = drop_opposed(gram_matrix([x, -x]), [1.0, 1.0], 0.0)
    assert (two.kept, two.dropped) == ([0, 1], [])  # two: no majority to side with
    three = drop_opposed(gram_matrix([x, x + y, -x]), [1.0, 1.0, 1.0], 0.0)
    kept, dropped = three.kept, three.dropped
    assert kept == [0, 1] and [i for i, _, _ in dropped] == [2]
    agree = drop_opposed(gram_matrix([x, x + y, x - y]), [1.0, 1.0, 1.0], 0.0)
    assert (agree.kept, agree.dropped) == ([0, 1, 2], [])


def test_update_change_is_the_vector_whose_norm_is_the_update_norm():
    from fedlora.robust import update_change

    start, new = _f(1), _f(2, scale=2.0)
    v = update_change(start, new)
    assert v.dtype == torch.float32 and v.numel() == sum(t.numel() for _, t in new.tensors())
    assert float(v.double().norm()) == pytest.approx(update_norm(start, new), rel=1e-6)
    m = min(new.modules)
    first = (new.modules[m].A - start.modules[m].A).flatten()
    torch.testing.assert_close(v[: first.numel()], first)
    # The same factors listed in another order (the wire's and a PEFT model's may differ) give the same vector.
    a, b, c, d = _f(3), _f(4), _f(5), _f(6)

    def two(x: LoraFactors, y: LoraFactors, flip: bool) -> LoraFactors:
        mods = [("z", x.modules["m"]), ("a", y.modules["m"])]
        extras = [("z.w", x.extras["head.w"]), ("a.w", y.extras["head.w"])]
        return LoraFactors(modules=dict(mods[::-1] if flip else mods), extras=dict(extras[::-1] if flip else extras))

    torch.testing.assert_close(
        update_change(two(a, b, False), two(c, d, True)),
        update_change(two(a, b, True), two(c, d, False)),
        rtol=0,
        atol=0,
    )


def test_update_change_of_a_pruned_client_counts_the_starts_first_components_and_nothing_is_empty():
    from fedlora.robust import update_change

    start, new = _f(1, rank=5), _f(2, rank=3)
    v = update_change(start, new)
    assert v.numel() == sum(t.numel() for _, t in new.tensors())  # new's rank, not the start's
    assert float(v.double().norm()) == pytest.approx(update_norm(start, new), rel=1e-6)
    empty = update_change(LoraFactors(), LoraFactors())
    assert empty.shape == (0,)


def test_a_median_round_over_its_held_budget_is_refused_when_the_strategy_is_built():
    """The robust layer's check (its ``attach`` hook) sees the strategy's global adapter: a median of
    the run's 3 replies that would hold more than robust.held_updates_budget_mb is refused with the figures."""
    from test_strategy_maths import _setup

    from fedlora.schema import ConfigError

    _setup("fedit", "fixed", [4] * 10, **{"robust.aggregation": "median"})  # the default budget holds it
    with pytest.raises(
        ConfigError,
        match=r"median holds every reply of a round, 3 clients x .* MiB.*above robust.held_updates_budget_mb",
    ):
        _setup("fedit", "fixed", [4] * 10, **{"robust.aggregation": "median", "robust.held_updates_budget_mb": "1e-6"})


def test_a_round_whose_median_reply_did_not_move_says_its_norm_bounds_were_not_applied():
    """Six of ten clients send back what they were given: the round's median normalised norm is 0,
    so the norm bound and the weight from the norm have no reference. The round folds the ten, cuts
    no one for size, and its flagged line says why with the count; with every reply silent too."""
    for silent in (6, 10):
        _, rl = _attacked_round(list(range(10)), dict.fromkeys(range(silent), "silent"))
        assert rl.accepted == 10 and not rl.rejected and not rl.clipped, (rl.rejected, rl.clipped)
        assert rl.flagged == [
            "robust.relative_norm_bound not applied: the round's median update norm / examples^0.5 is 0 "
            f"({silent} of 10 replies sent back what they were given)"
        ], rl.flagged


def test_client_level_dp_turns_the_round_bounds_off():
    """Under client-level DP the release's clip C bounds every client; a threshold taken from the
    other clients' updates would break its analysis, so neither the norm bound nor the direction
    bound acts: a flip at 3.5x is folded (clipped to C by the release), and no round figure or line
    comes from the bounds."""
    dp = {
        "privacy.client_dp": "true",
        "privacy.client_noise_multiplier": "0.5",
        "privacy.client_clip": "0.05",
        "privacy.noise_seed": "3",
    }
    _, rl = _attacked_round(list(range(10)), {4: "flip"}, settings=dp)
    assert rl.released_by == "client-dp" and rl.accepted == 10 and not rl.rejected, rl.rejected
    assert not rl.clipped and not any("robust" in x for x in rl.flagged), (rl.clipped, rl.flagged)
    assert "direction-cosines" not in rl.figures and "direction-floor" not in rl.figures


def _round_of_five(weights: list[int], **extra: str):
    """One FedIT round of five clients declaring and reporting ``weights`` examples, the round
    bounds off (so the fold's weights are the declared ones after the weight cap): (the strategy's
    new global adapter, each update as its fold takes it, the round log, the strategy)."""
    from test_folds import _replies, _train_round
    from test_strategy_maths import _setup

    sets = {
        "federation.num_clients": "5",
        "federation.min_train_clients": "5",
        "robust.relative_norm_bound": "0",
        "robust.min_cosine": "-1",
        **extra,
    }
    _, s, profiles, template = _setup("fedit", "fixed", [4] * 5, **sets)
    profiles = [dataclasses.replace(p, num_train=w) for p, w in zip(profiles, weights)]
    s.profiles = {p.node_id: p for p in profiles}
    replies = _replies(s, profiles, template, 1, weights)
    inputs = [s.fold_input(s.validate_reply(p, r.content, 1)) for p, r in zip(profiles, replies)]
    rl = _train_round(s, profiles, replies, 1)
    return s.global_eff, inputs, rl, s


def _close_all(a: LoraFactors, b: LoraFactors) -> None:
    """test_folds' comparison, at this file's tolerance."""
    from test_folds import _close

    _close(a, b, rtol=1e-5, atol=1e-7)


def _weighted(inputs: list[LoraFactors], weights: list[float]) -> LoraFactors:
    from fedlora.aggregation.folds import WeightedMean, batch

    return batch(WeightedMean(), inputs, [float(w) for w in weights]).finish()


def test_the_robust_statistics_replace_the_mean_and_the_share_cap_wraps_only_the_mean():
    """robust.aggregation puts its statistic in the strategy's round in place of the weighted mean
    (weights ignored); robust.max_client_share caps the weighted mean's shares by water-filling, and
    leaves a coordinate statistic, which has no weights to cap, as it is."""
    weights = [10, 20, 30, 40, 200]
    plain, inputs, _, _ = _round_of_five(weights, **{"robust.max_weight_factor": "0"})
    _close_all(plain, _weighted(inputs, weights))
    median, _, _, _ = _round_of_five(weights, **{"robust.aggregation": '"median"', "robust.max_weight_factor": "0"})
    _close_all(median, coordinate_median(inputs))
    trimmed, _, _, _ = _round_of_five(
        weights, **{"robust.aggregation": '"trimmed-mean"', "robust.trim_fraction": "0.2"}
    )
    _close_all(trimmed, trimmed_mean(inputs, 0.2))
    capped, _, _, _ = _round_of_five(weights, **{"robust.max_client_share": "0.3", "robust.max_weight_factor": "0"})
    _close_all(capped, _weighted(inputs, cap_shares([float(w) for w in weights], 0.3)))
    median_capped, _, _, _ = _round_of_five(
        weights, **{"robust.aggregation": '"median"', "robust.max_client_share": "0.3"}
    )
    _close_all(median_capped, coordinate_median(inputs))
    for other in (median, trimmed, capped):  # each differs from the plain mean, so each check tells them apart
        assert not all(
            torch.allclose(x, y, rtol=1e-3, atol=0) for (_, x), (_, y) in zip(other.tensors(), plain.tensors())
        )


def test_the_weight_cap_is_applied_in_the_strategys_round_named_and_follows_the_federation():
    """One client of five declares 10x the median size: its weight in the fold is
    robust.max_weight_factor (4) x the median declared size, named with both figures; at 0 the
    cap is off. When the federation changes (more large clients join), the median the cap is taken
    from follows it."""
    weights = [10_000, 1000, 1000, 1000, 1000]
    got, inputs, rl, s = _round_of_five(weights)
    _close_all(got, _weighted(inputs, [4000, 1000, 1000, 1000, 1000]))
    assert rl.clipped == [
        "client c0: weight 10000 examples capped at 4000 (robust.max_weight_factor 4 x the median declared size 1000)"
    ]
    off, _, off_rl, _ = _round_of_five(weights, **{"robust.max_weight_factor": "0"})
    _close_all(off, _weighted(inputs, weights))
    assert not off_rl.clipped
    robust = next(e for e in s.extensions if e.name == "robust")
    c0 = s.profiles[100]
    assert robust.bound_reply(s, c0, inputs[0], 10_000.0, 2, None)[1] == 4000.0
    for i in range(5, 8):  # three more clients of 10,000: the median declared size is now 10,000
        s.profiles[100 + i] = dataclasses.replace(c0, node_id=100 + i, client_id=f"c{i}", partition_id=i)
    assert robust.bound_reply(s, c0, inputs[0], 10_000.0, 2, None)[1] == 10_000.0


def test_a_coordinate_statistic_is_refused_exactly_above_its_budget_and_says_what_it_holds(caplog):
    """robust.aggregation = "median" holds the sampled cohort's shared factors as float32: with 10
    clients sampled at fraction_train 0.5 that is 5 replies. A budget of exactly that size runs
    (and the log says so); a hair under it is refused with the cohort and the total."""
    from test_strategy_maths import _setup

    from fedlora.schema import ConfigError

    sets = {
        "federation.num_clients": "10",
        "federation.fraction_train": "0.5",
        "federation.min_train_clients": "2",
        "robust.aggregation": '"median"',
    }
    _, s, _, template = _setup("fedit", "fixed", [4] * 3, **sets)
    need = 5 * template.select(s.sharing_policy.shared).numel() * 4 / 2**20
    with caplog.at_level("INFO", logger="fedlora.server"):
        _setup("fedit", "fixed", [4] * 3, **sets, **{"robust.held_updates_budget_mb": repr(need)})
    assert any(
        r.getMessage().startswith("robust.aggregation = median holds every reply of a round: 5 clients x ")
        and r.getMessage().endswith(f" MiB = {need:.0f} MiB")
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    with pytest.raises(ConfigError, match=r"median holds every reply of a round, 5 clients x .* MiB, above") as exc:
        _setup("fedit", "fixed", [4] * 3, **sets, **{"robust.held_updates_budget_mb": repr(need * (1 - 1e-9))})
    assert "sample fewer clients, raise the budget, or use 'mean' with robust.update_norm_bound" in str(exc.value)
    mean = {k: v for k, v in sets.items() if k != "robust.aggregation"}  # the mean folds as replies arrive
    caplog.clear()
    with caplog.at_level("INFO", logger="fedlora.server"):
        _setup("fedit", "fixed", [4] * 3, **mean, **{"robust.held_updates_budget_mb": "1e-9"})
    assert not any("holds every reply" in r.getMessage() for r in caplog.records)


def test_a_client_whose_direction_fell_below_min_cosine_must_not_lean_away_in_the_rounds_after():
    """robust.direction_probation (2): c4's flip (its honest update leans 0.15 towards the others') is
    left out in round 1 and the strategy's checkpointed state says so. In round 2 c4 flips an
    update that leans only 0.02 towards the others: its cosine is just under 0, inside min_cosine,
    yet it is left out, named with the round it was caught in; without that history, in round 4
    (past the window) or with the probation off, the same flip is kept (clipped to the norm bound
    only), and c4's honest update, just over 0, is kept on probation."""
    steps = [0.5] * 10
    steps[4] = 0.15
    s, first = _attacked_round(list(range(10)), {4: "flip"}, shared_step=steps)
    assert [x.split(" (node")[0] for x in first.rejected] == ["client c4"]
    state = s.state_dict()[1]["extensions"]
    assert state["robust"] == {"direction-below-min-cosine": {"c4": 1}}
    steps[4] = 0.05
    _, caught = _attacked_round(list(range(10)), {4: "flip"}, shared_step=steps, server_round=2, state=state)
    (line,) = caught.rejected
    assert caught.figures["direction-cosines"]["c4"] > -0.1 and caught.accepted == 9
    assert line.startswith("client c4 (node 104): update direction has cosine -0.0") and line.endswith(
        "below 0, its floor since the direction bound cut its update in round 1 "
        "(robust.direction_probation); left out of the fold"
    ), line
    for kept in (
        _attacked_round(list(range(10)), {4: "flip"}, shared_step=steps, server_round=2)[1],
        _attacked_round(list(range(10)), {4: "flip"}, shared_step=steps, server_round=4, state=state)[1],
        _attacked_round(
            list(range(10)), {4: "flip"}, shared_step=steps, server_round=2, state=state, direction_probation="0"
        )[1],
        _attacked_round(list(range(10)), {}, shared_step=steps, server_round=2, state=state)[1],
    ):
        assert not kept.rejected and kept.accepted == 10, kept.rejected
    s3, third = _attacked_round(list(range(10)), {4: "flip"}, shared_step=steps, server_round=3, state=state)
    assert third.rejected and s3.state_dict()[1]["extensions"]["robust"] == {"direction-below-min-cosine": {"c4": 3}}
    s4, _ = _attacked_round(list(range(10)), {}, shared_step=steps, server_round=4, state=state)
    assert s4.state_dict()[1]["extensions"]["robust"] == {"direction-below-min-cosine": {}}  # past its window
    robust = next(e for e in s3.extensions if e.name == "robust")
    robust.load_server_state({})  # a checkpoint written without the history: none
    assert robust.server_state() == {"direction-below-min-cosine": {}}
    # min_cosine 0 without history: the same cut is min_cosine's, not the probation's
    _, plain = _attacked_round(list(range(10)), {4: "flip"}, shared_step=steps, server_round=2, min_cosine="0")
    assert plain.rejected and plain.rejected[0].endswith("below robust.min_cosine (0); left out of the fold")

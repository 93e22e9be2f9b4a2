"""Continual learning's pure maths: O-LoRA's and AM-LoRA's penalties, the accuracy matrix's figures,
task-aware accuracy. Fast and model-free, so `benchmarks.mutation` runs them per mutant."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlora.continual.metrics import average_accuracy, backward_transfer, forgetting
from fedlora.continual.penalties import attention_l1, l2_norms, orthogonality


# ------------------------------------------------------------------------------------ penalties
@given(st.integers(1, 6), st.integers(1, 6), st.integers(2, 12), st.integers(0, 10_000))
def test_orthogonality_is_the_formula_in_both_forms(rp, r, d, seed):
    g = torch.Generator().manual_seed(seed)
    past, new = torch.randn(rp, d, generator=g), torch.randn(r, d, generator=g)
    explicit = [[sum(float(past[i, k]) * float(new[j, k]) for k in range(d)) for j in range(r)] for i in range(rp)]
    assert float(orthogonality(past, new, "abs")) == pytest.approx(
        sum(abs(x) for row in explicit for x in row), rel=1e-4
    )
    assert float(orthogonality(past, new, "squared")) == pytest.approx(
        sum(x * x for row in explicit for x in row), rel=1e-4
    )


def test_orthogonality_is_zero_for_orthogonal_subspaces_and_positive_otherwise():
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    past, new = q[:, :3].T, q[:, 3:6].T  # rows span orthogonal subspaces
    for form in ("abs", "squared"):
        assert float(orthogonality(past, new, form)) == pytest.approx(0.0, abs=1e-5)
        assert float(orthogonality(past, past + 0.1 * new, form)) > 0.1
    assert float(orthogonality(past, past)) == float(orthogonality(past, past, "abs"))  # the code's form by default
    with pytest.raises(ValueError, match="input features"):
        orthogonality(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="'abs' or 'squared'"):
        orthogonality(past, new, "cubed")


def test_l2_is_the_sum_of_unsquared_norms_and_attention_l1_skips_the_zero_lora():
    assert float(l2_norms([torch.tensor([3.0, 4.0]), torch.tensor([[6.0, 8.0]])])) == pytest.approx(15.0)
    assert float(l2_norms([])) == 0.0
    att = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])
    assert float(attention_l1(att)) == pytest.approx(0.25)  # mean of (0.5, 0.0)


def test_continual_figures_on_a_known_matrix():
    R = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 0.95]]
    assert average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert forgetting(R) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    with pytest.raises(ValueError, match=r"R\[1\]\[0\]"):
        average_accuracy([[0.9, None], [None, 0.8]])


def test_task_aware_accuracy_takes_the_argmax_over_the_tasks_own_labels():
    from fedlora.continual.metrics import accuracies

    # union of 5 labels; the task owns labels 3 and 4; example 0 is drawn to label 0 (another task's)
    logits = torch.tensor([[9.0, 0, 0, 1, 2], [0, 0, 0, 5, 1], [0, 8, 0, 3, 1]])
    labels = torch.tensor([4, 3, 3])
    agnostic, aware = accuracies(logits, labels, [3, 4])
    assert agnostic == pytest.approx(1 / 3) and aware == pytest.approx(1.0)


@given(st.integers(2, 8), st.integers(1, 20), st.integers(0, 10_000))
def test_task_aware_accuracy_is_never_below_agnostic_and_equal_with_every_label(n, batch, seed):
    from fedlora.continual.metrics import accuracies

    g = torch.Generator().manual_seed(seed)
    own = sorted(torch.randperm(n, generator=g)[: max(1, n // 2)].tolist())
    logits = torch.randn(batch, n, generator=g)
    labels = torch.tensor(own)[torch.randint(len(own), (batch,), generator=g)]
    agnostic, aware = accuracies(logits, labels, own)
    assert aware >= agnostic
    assert accuracies(logits, labels, list(range(n))) == (agnostic, agnostic)


def test_attention_l1_sums_over_tasks_per_input_then_averages():
    # (batch 2, tokens 3, zero LoRA + 2 tasks); per-token task weights 0.9, 0.5, 0.0 / 0.2, 0.2, 0.2
    att = torch.tensor(
        [[[0.1, 0.6, 0.3], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], [[0.8, 0.1, 0.1], [0.8, 0.2, 0.0], [0.8, 0.0, 0.2]]]
    )
    assert float(attention_l1(att)) == pytest.approx((0.9 + 0.5 + 0.0 + 0.2 * 3) / 6)


def test_figures_of_one_and_two_tasks_and_malformed_matrices():
    assert backward_transfer([[0.7]]) == 0.0 and forgetting([[0.7]]) == 0.0 and average_accuracy([[0.7]]) == 0.7
    R2 = [[0.9, None], [0.6, 0.8]]
    assert backward_transfer(R2) == pytest.approx(-0.3) and forgetting(R2) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="R must be square: row 1 has 1 entries, not 2"):
        average_accuracy([[0.9, None], [0.6]])


def test_empty_task_accuracy_is_zero_not_nan():
    from fedlora.continual.metrics import accuracies

    assert accuracies(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), [1]) == (0.0, 0.0)


def test_summary_from_metrics_rows_reads_either_inference_setting():
    from fedlora.continual.metrics import from_rows

    rows = [
        {"round": 0},
        {
            "round": 1,
            "continual-task": 0,
            "continual-accuracy": {"a": 0.9},
            "continual-accuracy-task-aware": {"a": 0.95},
        },
        {
            "round": 2,
            "continual-task": 1,
            "continual-accuracy": {"a": 0.5, "b": 0.8},
            "continual-accuracy-task-aware": {"a": 0.7, "b": 0.85},
        },
    ]
    agnostic = from_rows(rows, ["a", "b"])
    assert agnostic["R"] == [[0.9, None], [0.5, 0.8]]
    assert agnostic["average-accuracy"] == pytest.approx(0.65) and agnostic["bwt"] == pytest.approx(-0.4)
    assert agnostic["forgetting"] == pytest.approx(0.4)
    aware = from_rows(rows, ["a", "b"], key="continual-accuracy-task-aware")
    assert aware["R"] == [[0.95, None], [0.7, 0.85]] and aware["bwt"] == pytest.approx(-0.25)
    unfinished = from_rows(rows[:2], ["a", "b"])
    assert unfinished["average-accuracy"] is None and "R[1][0]" in unfinished["incomplete"]
    multi = from_rows([{"continual-task": 0, "continual-accuracy": {"a": 0.8, "b": 0.6}}], ["a", "b"], multitask=True)
    assert multi["average-accuracy"] == pytest.approx(0.7) and multi["R"] == [[0.8, 0.6]] and multi["bwt"] is None


def test_routing_stages_keep_each_tasks_routing_in_order_and_multitask_without_every_task_has_no_average():
    from fedlora.continual.metrics import from_rows, routing_stages

    rows = [
        {"round": 1, "continual-task": 0, "amlora-routing": {"a": [0.2, 0.8]}},
        {"round": 2, "continual-task": 0},
        {"round": 3, "continual-task": 1, "amlora-routing": {"a": [0.1, 0.6, 0.3], "b": [0.0, 0.1, 0.9]}},
    ]
    assert routing_stages(rows, ["a", "b"]) == [
        {"after": "a", "routing": {"a": [0.2, 0.8]}},
        {"after": "b", "routing": {"a": [0.1, 0.6, 0.3], "b": [0.0, 0.1, 0.9]}},
    ]
    assert routing_stages([{"round": 1}], ["a"]) == []
    partial = from_rows([{"continual-task": 0, "continual-accuracy": {"a": 0.8}}], ["a", "b"], multitask=True)
    assert partial["R"] == [[0.8, None]] and partial["average-accuracy"] is None and partial["tasks"] == ["a", "b"]
    assert from_rows([], ["a"], multitask=True)["average-accuracy"] is None
    full = from_rows([{"continual-task": 0, "continual-accuracy": {"a": 0.9}}], ["a"])
    assert full == {"tasks": ["a"], "R": [[0.9]], "average-accuracy": 0.9, "bwt": 0.0, "forgetting": 0.0}


def test_forgetting_takes_the_best_earlier_accuracy_not_the_first():
    R = [[0.5, None, None], [0.9, 0.7, None], [0.4, 0.6, 0.8]]  # task 0 peaks after task 1
    assert forgetting(R) == pytest.approx(((0.9 - 0.4) + (0.7 - 0.6)) / 2)
    assert backward_transfer(R) == pytest.approx(((0.4 - 0.5) + (0.6 - 0.7)) / 2)


# ------------------------------------------------------------------------------------ AM-LoRA's input keys
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(0, 10_000))
def test_pooled_inputs_average_each_input_over_its_real_positions_only(batch, positions, features, seed):
    from fedlora.continual.routing import pooled_inputs

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, positions, features, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, positions + 1, (batch,), generator=g)
    mask = (torch.arange(positions).unsqueeze(0) < lengths.unsqueeze(1)).long()
    pooled = pooled_inputs(x, mask)
    for b in range(batch):
        n = int(lengths[b])
        explicit = [sum(float(x[b, p, f]) for p in range(n)) / n for f in range(features)]
        assert pooled[b].tolist() == pytest.approx(explicit, rel=1e-9, abs=1e-12)
    # no mask, or one that does not fit (a direct call of a layer): every position counts
    assert torch.allclose(pooled_inputs(x, None), x.mean(1))
    assert torch.allclose(pooled_inputs(x, mask[:, :-1] if positions > 1 else None), x.mean(1))
    assert torch.equal(pooled_inputs(x[:, 0], mask), x[:, 0])  # already one vector per input
    assert torch.allclose(pooled_inputs(x.unsqueeze(1), None), x.mean(1))  # (batch, 1, positions, features)


def test_moments_are_the_sums_of_the_values_and_their_squares_and_the_count():
    from fedlora.continual.routing import moments

    p = torch.tensor([[1.0, -2.0], [3.0, 0.5]], requires_grad=True)
    s1, s2, n = moments(p)
    assert s1.tolist() == [4.0, -1.5] and s2.tolist() == [10.0, 4.25] and n == 2
    assert s1.dtype == torch.float64 and not s1.requires_grad


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_key_scores_are_the_mean_diagonal_gaussian_log_density_over_the_temperature(batch, tasks, features, seed):
    from fedlora.continual.routing import VARIANCE_FLOOR, key_scores

    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(batch, features, generator=g, dtype=torch.float64)
    mean = torch.randn(tasks, features, generator=g, dtype=torch.float64)
    var = torch.rand(tasks, features, generator=g, dtype=torch.float64) + 0.1
    second = var + mean**2
    temperature = 0.5 + float(torch.rand((), generator=g))
    scores = key_scores(pooled, mean, second, temperature)
    assert scores.shape == (batch, tasks)
    for b in range(batch):
        for t in range(tasks):
            floor = VARIANCE_FLOOR * sum(float(var[t, f]) for f in range(features)) / features + 1e-12
            v = [float(var[t, f]) + floor for f in range(features)]
            terms = [(float(pooled[b, f]) - float(mean[t, f])) ** 2 / v[f] + math.log(v[f]) for f in range(features)]
            assert float(scores[b, t]) == pytest.approx(-0.5 * sum(terms) / features / temperature, rel=1e-9)


def test_key_scores_pick_the_task_whose_inputs_an_input_resembles_and_survive_an_unmeasured_slot():
    from fedlora.continual.routing import key_scores, moments

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g, dtype=torch.float64) * 2
    samples = [c + 0.5 * torch.randn(200, 16, generator=g, dtype=torch.float64) for c in centres]
    sums = [moments(s) for s in samples]
    mean = torch.stack([s1 / n for s1, _, n in sums])
    second = torch.stack([s2 / n for _, s2, n in sums])
    for t, c in enumerate(centres):
        fresh = c + 0.5 * torch.randn(50, 16, generator=g, dtype=torch.float64)
        assert (key_scores(fresh, mean, second, 1.0).argmax(-1) == t).all()
    # a slot no client has measured yet (all zero): finite, and far below a measured one
    unmeasured = key_scores(samples[0][:5], torch.zeros(2, 16).double(), torch.zeros(2, 16).double(), 1.0)
    assert torch.isfinite(unmeasured).all()
    assert (unmeasured < key_scores(samples[0][:5], mean[:1], second[:1], 1.0) - 100).all()
    # a feature that never varied within a task is floored, not a division by zero
    flat = second.clone()
    flat[0, 0] = mean[0, 0] ** 2
    assert torch.isfinite(key_scores(samples[1][:5], mean, flat, 1.0)).all()

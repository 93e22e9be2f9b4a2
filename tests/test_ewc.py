"""EWC, a plug-in continual method (fedlora/methods/ewc.py): its Fisher and penalty maths, and a
task sequence that runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import continual_config, make_config
from fedlora.config import ConfigError
from fleet import run_recorded


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 3),
       shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3))
def test_the_penalty_is_the_fisher_weighted_squared_distance_summed_over_tasks(seed, tasks, shapes):
    from fedlora.methods._ewc import ewc_penalty

    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.normal(size=s) for i, s in enumerate(shapes)}
    anchors = [{"theta": {n: rng.normal(size=p.shape) for n, p in params.items()},
                "fisher": {n: rng.random(size=p.shape) for n, p in params.items()}} for _ in range(tasks)]
    expected = sum(float(np.sum(a["fisher"][n] * (p - a["theta"][n]) ** 2)) for a in anchors for n, p in params.items())
    t = {n: torch.tensor(p, dtype=torch.float64) for n, p in params.items()}
    ta = [{k: {n: torch.tensor(v, dtype=torch.float64) for n, v in a[k].items()} for k in a} for a in anchors]
    got = float(ewc_penalty(t, ta))
    assert abs(got - expected) <= 1e-9 * max(1.0, expected)


def _model(tmp_path):
    from fedlora.data import load_task
    from fedlora.model import AdapterSpec, build_peft_model, set_trainable

    cfg = make_config(tmp_path)
    task = load_task(cfg)
    model = build_peft_model(cfg, task.num_labels, AdapterSpec.for_rank(cfg, 4))
    set_trainable(model, frozenset({"A", "B"}))
    with torch.no_grad():  # B away from zero: every factor then has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model, task


def test_the_fisher_is_the_mean_of_each_examples_squared_gradient(tmp_path, shared_data):
    """Against the definition, one example at a time through .grad (dropout off), not the batch's
    squared mean gradient (which would be smaller)."""
    import torch.nn.functional as F

    from fedlora.data import batches
    from fedlora.methods._ewc import diagonal_fisher, trainable

    model, task = _model(tmp_path)
    model.train()
    got = diagonal_fisher(model, task.train, 5, torch.device("cpu"))
    assert model.training  # restored after the estimate (dropout off inside it)
    params = trainable(model)
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for i, (batch, labels) in enumerate(batches(task.train, 1, shuffle=False)):
        if i == 5:
            break
        model.zero_grad()
        F.cross_entropy(model(**batch).logits, labels).backward()
        for n, p in params.items():
            want[n] += p.grad ** 2 / 5
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=1e-5, atol=1e-12), n
    assert all(bool((f >= 0).all()) for f in got.values()) and any(float(f.sum()) > 0 for f in got.values())


def test_ewc_is_a_continual_method_refused_with_dp_sgd(tmp_path, shared_data):
    assert continual_config(tmp_path, "ewc").continual.method == "ewc"
    with pytest.raises(ConfigError, match="per-example clipping"):
        continual_config(tmp_path, "ewc", privacy={"example_dp": True, "example_noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="ewc.fisher_examples"):
        continual_config(tmp_path, "ewc", ewc={"fisher_examples": 0})


@pytest.mark.federation
def test_a_task_sequence_under_ewc_pulls_toward_the_finished_task_by_its_weight(tmp_path, shared_data):
    """Task 1's replies report the penalty (task 0's: none); a large weight keeps the Fisher-weighted
    distance from task 0's parameters far smaller; each client keeps (theta*, F) in its store."""
    penalty = {}
    for weight in (0.0, 1e6):
        cfg = continual_config(tmp_path / f"w{weight:g}", "ewc", ewc={"weight": weight, "fisher_examples": 8})
        run_dir, _, grid = run_recorded(cfg, engine="inprocess")
        replies = grid.train_replies()
        assert replies and not any(m.has_error() for m in replies)
        assert all("ewc-penalty" not in m.content["metrics"] for m in replies[:2])  # task 0: nothing to protect
        late = [float(m.content["metrics"]["ewc-penalty"]) for m in replies[2:]]
        assert len(late) == 2
        penalty[weight] = sum(late) / 2
        assert len(list(run_dir.path.rglob("ewc-*task0*"))) == 2  # (theta*, F) of task 0, one per client
    assert penalty[0.0] > 0 and penalty[1e6] < 0.2 * penalty[0.0]


def test_the_hook_adds_nothing_at_the_anchor_and_the_weighted_penalty_as_the_factors_move(tmp_path, shared_data):
    from fedlora.methods._ewc import EWCPenalty, trainable
    from fedlora.training import TrainContext

    model, _ = _model(tmp_path)
    params = trainable(model)
    name = next(iter(params))
    theta = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.full_like(p, 2.0) for n, p in params.items()}
    hook = EWCPenalty(10.0, [{"theta": theta, "fisher": fisher}])
    ctx = TrainContext(model=model, params=list(params.values()), optimizer=None, data=None, tc=None, seed=0,
                       device=torch.device("cpu"), target_steps=0, batch_source=None)
    hook.begin(ctx)
    base = torch.tensor(0.7)
    assert float(hook.loss(ctx, base).detach()) == pytest.approx(0.7)
    with torch.no_grad():
        params[name].add_(0.1)
    penalty = 2.0 * 0.01 * params[name].numel()
    assert float(hook.loss(ctx, base).detach()) == pytest.approx(0.7 + 5.0 * penalty, rel=1e-4)
    assert hook.end(ctx)["ewc-penalty"] == pytest.approx(penalty, rel=1e-4)
    wrong = EWCPenalty(1.0, [{"theta": {"x": torch.zeros(1)}, "fisher": {"x": torch.zeros(1)}}])
    with pytest.raises(ValueError, match="do not match the model's trainable parameters"):
        wrong.begin(ctx)

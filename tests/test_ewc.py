"""EWC, a plug-in continual method (fedlora/methods/ewc.py): its Fisher and penalty maths, and a
task sequence that runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import continual_config
from fedlora.config import ConfigError
from fleet import run_recorded
from tiny_model import hook_context


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    tasks=st.integers(1, 3),
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
)
def test_the_penalty_is_the_fisher_weighted_squared_distance_summed_over_tasks(seed, tasks, shapes):
    from fedlora.methods._ewc import ewc_penalty

    rng = np.random.default_rng(seed)
    params = {f"p{i}": rng.normal(size=s) for i, s in enumerate(shapes)}
    anchors = [
        {
            "theta": {n: rng.normal(size=p.shape) for n, p in params.items()},
            "fisher": {n: rng.random(size=p.shape) for n, p in params.items()},
        }
        for _ in range(tasks)
    ]
    expected = sum(float(np.sum(a["fisher"][n] * (p - a["theta"][n]) ** 2)) for a in anchors for n, p in params.items())
    t = {n: torch.tensor(p, dtype=torch.float64) for n, p in params.items()}
    ta = [{k: {n: torch.tensor(v, dtype=torch.float64) for n, v in a[k].items()} for k in a} for a in anchors]
    got = float(ewc_penalty(t, ta))
    assert abs(got - expected) <= 1e-9 * max(1.0, expected)


@pytest.mark.parametrize("limit, mode", [(3, "train"), (3, "eval"), (1, "train"), (50, "train")])
def test_the_fisher_is_the_mean_of_each_examples_squared_gradient(limit, mode):
    """Against the definition, one example at a time through .grad with dropout off, over the first
    ``limit`` examples (all of them when there are fewer), not the batch's squared mean gradient
    (which would be smaller); the frozen parameters have none, and the model's mode comes back."""
    import torch.nn.functional as F

    from fedlora.data import batches
    from fedlora.methods._ewc import diagonal_fisher, trainable
    from tiny_model import TinyClassifier, tiny_examples

    model, data = TinyClassifier(5), tiny_examples(6, 5)
    model.train(mode == "train")
    got = diagonal_fisher(model, data, limit, torch.device("cpu"))
    assert model.training == (mode == "train")
    params = trainable(model)
    assert set(got) == set(params) and "emb.weight" not in got
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    used = min(limit, len(data))
    for i, (batch, labels) in enumerate(batches(data, 1, shuffle=False)):
        if i == used:
            break
        model.zero_grad()
        F.cross_entropy(model(**batch).logits, labels).backward()
        for n, p in params.items():
            want[n] += p.grad**2 / used
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-12)
    assert all(bool((f >= 0).all()) for f in got.values()) and all(float(f.sum()) > 0 for f in got.values())


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


def test_the_hook_adds_nothing_at_the_anchor_and_the_weighted_penalty_as_the_factors_move():
    from fedlora.methods._ewc import EWCPenalty, trainable
    from tiny_model import TinyClassifier

    model = TinyClassifier(4)
    params = trainable(model)
    name = next(iter(params))
    theta = {n: p.detach().clone() for n, p in params.items()}
    fisher = {n: torch.full_like(p, 2.0) for n, p in params.items()}
    hook = EWCPenalty(10.0, [{"theta": theta, "fisher": fisher}, {"theta": theta, "fisher": fisher}])
    ctx = hook_context(model, list(params.values()), device=torch.device("cpu"))
    hook.begin(ctx)
    assert hook.end(ctx) == {"ewc-penalty": 0.0}  # no step taken yet
    base = torch.tensor(0.7)
    assert float(hook.loss(ctx, base).detach()) == pytest.approx(0.7)
    assert hook.end(ctx)["ewc-penalty"] == 0.0
    with torch.no_grad():
        params[name].add_(0.1)
    penalty = 2 * 2.0 * 0.01 * params[name].numel()  # two finished tasks anchored at the same point
    assert float(hook.loss(ctx, base).detach()) == pytest.approx(0.7 + 5.0 * penalty, rel=1e-4)
    assert hook.end(ctx)["ewc-penalty"] == pytest.approx(penalty, rel=1e-4)
    wrong = EWCPenalty(1.0, [{"theta": {"x": torch.zeros(1)}, "fisher": {"x": torch.zeros(1)}}])
    with pytest.raises(
        ValueError, match="^EWC: the stored task parameters do not match the model's trainable parameters$"
    ):
        wrong.begin(ctx)


def _three_task_config(tmp_path, method: str, **sections):
    from conftest import SHARED_DATA
    from fedlora.config import FedLoraConfig

    raw = continual_config(tmp_path, method, **sections).to_dict()
    raw["run"]["rounds"] = 3
    raw["continual"]["tasks"].append({"name": "yelp", "dataset": str(SHARED_DATA / "yelp"), "rounds": 1})
    return FedLoraConfig.from_dict(raw)


def client_round(cfg, server_round: int, model, store, partition: int = 0):
    """The client-side view of a round a continual plug-in's builder reads (no message needed)."""
    from fedlora.extensions import ClientRound
    from fedlora.factors import LoraFactors

    return ClientRound(
        cfg=cfg,
        server_round=server_round,
        config={},
        arrays=None,
        received=LoraFactors(),
        model=model,
        policy=None,
        client_id=f"c{partition}",
        partition_id=partition,
        store=store,
        device=torch.device("cpu"),
        data=None,
        modules=[],
    )


def test_the_builder_anchors_each_finished_task_at_the_model_received_when_the_next_began(
    tmp_path, shared_data, caplog
):
    """Nothing in the first task; in the next, one (theta*, F) of the finished task: theta* the model
    the client holds then, F its Fisher on that task's own training split, kept in the store and read
    back (not re-estimated) in later rounds; a task the client never anchored is skipped."""
    from fedlora.continual.tasks import task_client_data
    from fedlora.methods._ewc import EWCPenalty, diagonal_fisher, fisher_penalty, trainable
    from fedlora.state import ClientStateStore
    from tiny_model import TinyClassifier

    cfg = _three_task_config(tmp_path, "ewc", ewc={"weight": 3.0, "fisher_examples": 4})
    model, store = TinyClassifier(4 + 14 + 5), ClientStateStore(tmp_path / "state")
    assert fisher_penalty(client_round(cfg, 1, model, store), 3.0, 4) == []
    theta = {n: p.detach().clone() for n, p in trainable(model).items()}
    fisher = diagonal_fisher(model, task_client_data(cfg, 0, 0).train, 4, torch.device("cpu"))
    [hook] = fisher_penalty(client_round(cfg, 2, model, store), 3.0, 4)
    assert isinstance(hook, EWCPenalty) and hook.weight == 3.0 and len(hook.anchors) == 1
    for n in theta:
        torch.testing.assert_close(hook.anchors[0]["theta"][n], theta[n], rtol=0, atol=0)
        torch.testing.assert_close(hook.anchors[0]["fisher"][n], fisher[n])
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(1.0)
    [again] = fisher_penalty(client_round(cfg, 2, model, store), 3.0, 4)  # read back, not re-estimated
    for n in theta:
        torch.testing.assert_close(again.anchors[0]["theta"][n], theta[n], rtol=0, atol=0)
    [third] = fisher_penalty(client_round(cfg, 3, model, store), 3.0, 4)
    assert len(third.anchors) == 2  # task 0 as kept, task 1 at the model held now
    for n, p in trainable(model).items():
        torch.testing.assert_close(third.anchors[1]["theta"][n], p.detach(), rtol=0, atol=0)
    late = ClientStateStore(tmp_path / "late")  # a client whose first round is in the third task
    with caplog.at_level("INFO", logger="fedlora"):
        [only] = fisher_penalty(client_round(cfg, 3, model, late), 3.0, 4)
    assert len(only.anchors) == 1 and not late.has("c0", f"ewc-{cfg.digest()}-task0")
    assert [r.getMessage() for r in caplog.records if "EWC" in r.getMessage()] == [
        "client c0: EWC holds no parameters of finished task 0 (it trained in none of the rounds after it "
        "ended); that task is not protected"
    ]

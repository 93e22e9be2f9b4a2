"""LwF, a plug-in continual method (fedlora/methods/lwf.py): its distillation maths, the old
model's outputs, and a task sequence that runs it."""

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
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 5), labels=st.integers(2, 6), t=st.floats(0.5, 4.0))
def test_the_term_is_t_squared_times_the_kl_of_the_tempered_outputs(seed, batch, labels, t):
    from fedlora.methods._lwf import distillation_loss

    rng = np.random.default_rng(seed)
    z, z_old = rng.normal(size=(batch, labels)) * 3, rng.normal(size=(batch, labels)) * 3

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(z_old / t), softmax(z / t)
    expected = t * t * float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    got = float(distillation_loss(torch.tensor(z), torch.tensor(z_old), t))
    assert abs(got - expected) <= 1e-5 * max(1.0, expected)
    assert float(distillation_loss(torch.tensor(z), torch.tensor(z), t)) == pytest.approx(0.0, abs=1e-6)


def test_the_old_outputs_are_the_old_models_and_the_new_parameters_come_back_exactly():
    from fedlora.data import batches
    from fedlora.methods._lwf import Distillation
    from tiny_model import TinyClassifier, tiny_examples

    model, data = TinyClassifier(4), tiny_examples(8, 4)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    old = {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in params.items()}
    now = {n: p.detach().clone() for n, p in params.items()}
    hook = Distillation(1.0, 2.0, old, [0, 2])
    hook.params, hook.cols = params, torch.tensor([0, 2])
    batch, _ = next(iter(batches(data, 4, shuffle=False)))
    for mode in (True, False):
        model.train(mode)
        got = hook._old_outputs(model, batch)
        assert model.training == mode
        for n, p in params.items():
            assert torch.equal(p, now[n]), n
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(old[n])
            model.eval()
            want = model(**batch).logits[:, [0, 2]]  # dropout off: the old model's own outputs
            for n, p in params.items():
                p.copy_(now[n])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_lwf_is_refused_with_dp_sgd_and_checks_its_temperature(tmp_path, shared_data):
    assert continual_config(tmp_path, "lwf").continual.method == "lwf"
    with pytest.raises(ConfigError, match="not built"):
        continual_config(tmp_path, "lwf", privacy={"example_dp": True, "example_noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="lwf.temperature"):
        continual_config(tmp_path, "lwf", lwf={"temperature": 0.0})


@pytest.mark.federation
def test_a_task_sequence_under_lwf_stays_closer_to_the_old_outputs_by_its_weight(tmp_path, shared_data):
    kd = {}
    for weight in (1e-6, 100.0):
        cfg = continual_config(
            tmp_path / f"w{weight:g}",
            "lwf",
            lwf={"weight": weight},
            train={"learning_rate": 0.05, "local_epochs": 2, "batch_size": 16},
        )  # outputs move
        replies = run_recorded(cfg, engine="inprocess")[2].train_replies()
        assert len(replies) == 4 and not any(m.has_error() for m in replies)
        assert all("lwf-distillation" not in m.content["metrics"] for m in replies[:2])  # task 0: no old model
        late = [float(m.content["metrics"]["lwf-distillation"]) for m in replies[2:]]
        kd[weight] = sum(late) / len(late)
    assert kd[1e-6] > 0 and kd[100.0] < 0.5 * kd[1e-6]


def test_the_hook_distils_each_batch_against_the_old_models_outputs():
    """Through the loop's own seams: the batches it is given and the task loss it records. With the old
    model equal to the current one the term is zero; with another it is distillation_loss exactly,
    once per batch (a loss without a recorded batch adds nothing)."""
    import torch.nn.functional as F

    from fedlora.data import batches
    from fedlora.methods._lwf import Distillation, distillation_loss
    from fedlora.training import TrainContext
    from tiny_model import TinyClassifier, tiny_examples

    model, data = TinyClassifier(4, dropout=0.0), tiny_examples(8, 4)
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    cols = [0, 2]

    epochs: list[int] = []

    def run(old: dict) -> tuple[float, torch.Tensor, Distillation, TrainContext]:
        hook = Distillation(2.0, 2.0, old, cols)
        ctx = hook_context(
            model,
            list(params.values()),
            data=data,
            device=torch.device("cpu"),
            target_steps=1,
            batch_source=lambda epoch: (epochs.append(epoch), batches(data, 4, shuffle=False))[1],
            task_loss=lambda out, y: F.cross_entropy(out.logits, y),
        )
        hook.begin(ctx)
        # Before any batch, and with the old outputs of a batch but no recorded loss: nothing added.
        assert float(hook.loss(ctx, torch.tensor(0.3))) == pytest.approx(0.3)
        assert hook.end(None) == {"lwf-distillation": 0.0}
        next(iter(ctx.batch_source(5)))
        assert epochs[-1] == 5 and float(hook.loss(ctx, torch.tensor(0.3))) == pytest.approx(0.3)
        batch, labels = next(iter(ctx.batch_source(0)))
        out = model(**batch)
        loss = ctx.task_loss(out, labels)
        total = hook.loss(ctx, loss)
        return float((total - loss).detach()), out.logits.detach(), hook, ctx

    same = {n: p.detach().clone() for n, p in params.items()}
    added, _, _, _ = run(same)
    assert added == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(2)
    other = {n: p.detach().clone() + 0.5 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    added, logits, hook, ctx = run(other)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(other[n])
        batch, _ = next(iter(batches(data, 4, shuffle=False)))
        old_logits = model(**batch).logits
        for n, p in params.items():
            p.copy_(same[n])
    want = 2.0 * float(distillation_loss(logits[:, cols], old_logits[:, cols], 2.0))
    assert added > 0 and added == pytest.approx(want, rel=1e-4)
    assert hook.end(None)["lwf-distillation"] == pytest.approx(want / 2.0, rel=1e-4)
    loss = torch.tensor(0.3)
    assert float(hook.loss(ctx, loss)) == pytest.approx(0.3)  # this batch's term was already added
    wrong = Distillation(1.0, 2.0, {"x": torch.zeros(1)}, cols)
    with pytest.raises(ValueError, match="^LwF: the stored old model does not match the model's trainable parameters$"):
        wrong.begin(ctx)


def test_the_builder_keeps_the_model_each_task_began_with_and_distils_on_the_finished_tasks_labels(
    tmp_path, shared_data
):
    from test_ewc import _three_task_config, client_round

    from fedlora.continual.tasks import task_label_indices
    from fedlora.methods._lwf import Distillation, distillation
    from fedlora.state import ClientStateStore
    from tiny_model import TinyClassifier

    cfg = _three_task_config(tmp_path, "lwf")
    model, store = TinyClassifier(4 + 14 + 5), ClientStateStore(tmp_path / "state")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert distillation(client_round(cfg, 1, model, store), 1.0, 2.0) == []  # the first task: no old model
    assert distillation(client_round(cfg, 2, model, store), 0.0, 2.0) == []  # weight 0: off
    began = {n: p.detach().clone() for n, p in params.items()}
    [hook] = distillation(client_round(cfg, 2, model, store), 1.5, 3.0)
    assert isinstance(hook, Distillation) and (hook.weight, hook.temperature) == (1.5, 3.0)
    assert hook.labels == sorted(task_label_indices(cfg, 0))
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    [again] = distillation(client_round(cfg, 2, model, store), 1.5, 3.0)  # the kept old model, not today's
    for n in began:
        torch.testing.assert_close(again.old[n], began[n], rtol=0, atol=0)
    [third] = distillation(client_round(cfg, 3, model, store), 1.5, 3.0)
    assert third.labels == sorted(set(task_label_indices(cfg, 0)) | set(task_label_indices(cfg, 1)))
    for n, p in params.items():
        torch.testing.assert_close(third.old[n], p.detach(), rtol=0, atol=0)

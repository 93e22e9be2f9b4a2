"""FedProx, a plug-in method (fedlora/methods/fedprox.py): the proximal term's maths, its contract
with the server (``proximal-mu`` in the round's config), and what it does to a federation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_config
from fedlora.config import ConfigError
from fleet import run_recorded
from tiny_model import hook_context


def _tensors(seed: int, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mu=st.floats(1e-4, 10.0),
    shapes=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
)
def test_the_term_and_its_gradient_are_the_papers(seed, mu, shapes):
    """loss + mu/2 sum ||w - w0||^2: the added value is that, and its gradient is mu (w - w0)."""
    from fedlora.methods._fedprox import ProximalTerm

    w = [t.requires_grad_() for t in _tensors(seed, shapes)]
    w0 = _tensors(seed + 1, shapes)
    hook = ProximalTerm(mu, frozenset({"A"}))
    hook.params, hook.anchor = w, w0
    base = torch.tensor(0.25, dtype=torch.float64)
    total = hook.loss(None, base)
    expected = 0.25 + mu / 2 * sum(float(((a.detach() - b) ** 2).sum()) for a, b in zip(w, w0))
    assert abs(float(total.detach()) - expected) <= 1e-9 * max(1.0, abs(expected))
    total.backward()
    for a, b in zip(w, w0):
        assert torch.allclose(a.grad, mu * (a.detach() - b), rtol=1e-12, atol=1e-12)


def _model(tmp_path, strategy: str):
    from fedlora.factors import load_factors
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors, set_trainable
    from fedlora.registry import policy_for

    cfg = make_config(tmp_path, federation={"strategy": strategy})
    model = build_peft_model(cfg, 4, AdapterSpec.for_rank(cfg, 4))
    load_factors(model, initial_factors(model, 3))
    policy = policy_for(strategy)
    return model, set_trainable(model, policy.trained), policy


@pytest.mark.parametrize("strategy", ["fedit", "fedsa", "ffa"])
def test_only_the_shared_trained_factors_are_pulled(tmp_path, strategy):
    """FedSA-LoRA's private B and head, FFA-LoRA's frozen A: never in the term."""
    from fedlora.factors import ADAPTER, head_parameters, lora_layers
    from fedlora.methods._fedprox import ProximalTerm

    model, params, policy = _model(tmp_path, strategy)
    hook = ProximalTerm(1.0, policy.shared - policy.frozen)
    hook.begin(hook_context(model, params))
    got = {id(p) for p in hook.params}
    layers = [layer for _, layer in lora_layers(model)]
    a = {id(layer.lora_A[ADAPTER].weight) for layer in layers}
    b = {id(layer.lora_B[ADAPTER].weight) for layer in layers}
    head = {id(p) for _, p in head_parameters(model)}
    assert (a <= got) == ("A" in policy.shared and "A" not in policy.frozen)
    assert not (a & got) or "A" in policy.shared
    assert (b <= got) == ("B" in policy.shared)
    assert not (b & got) or "B" in policy.shared
    assert bool(head & got) == ("head" in policy.shared)


def test_the_hook_adds_nothing_at_its_anchor_and_the_term_as_the_factors_move(tmp_path):
    """On a real model: at the start the loss is the task loss exactly; after a factor moves by d, the
    hook adds mu/2 ||d||^2 and reports ||d|| as fedprox-distance."""
    from fedlora.methods._fedprox import ProximalTerm

    model, params, policy = _model(tmp_path, "fedit")
    hook = ProximalTerm(0.3, policy.shared - policy.frozen)
    ctx = hook_context(model, params)
    hook.begin(ctx)
    base = torch.tensor(1.5)
    assert float(hook.loss(ctx, base).detach()) == 1.5
    with torch.no_grad():
        hook.params[0].add_(0.1)  # one factor moves by 0.1 in every entry
    d2 = 0.01 * hook.params[0].numel()
    assert float(hook.loss(ctx, base).detach()) == pytest.approx(1.5 + 0.15 * d2, rel=1e-5)
    assert hook.end(ctx)["fedprox-distance"] == pytest.approx(d2**0.5, rel=1e-5)


def test_the_hook_refuses_a_model_that_trains_no_shared_part_and_mismatched_anchors(tmp_path):
    from fedlora.methods._fedprox import ProximalTerm, proximal_term

    model, params, _ = _model(tmp_path, "ffa")  # A frozen: a term on A alone has nothing to pull
    hook = ProximalTerm(1.0, frozenset({"A"}))
    with pytest.raises(ValueError, match=r"trains none of the shared parts \['A'\]"):
        hook.begin(hook_context(model, params))
    with pytest.raises(ValueError):
        proximal_term([torch.zeros(2)], [torch.zeros(2), torch.zeros(2)])


def test_fedprox_is_refused_with_dp_sgd_and_a_negative_mu_is_named(tmp_path):
    with pytest.raises(ConfigError, match="per-example clipping"):
        make_config(tmp_path, fedprox={"mu": 0.1}, privacy={"example_dp": True, "example_noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="fedprox.mu"):
        make_config(tmp_path, fedprox={"mu": -1.0})
    with pytest.raises(ConfigError, match="fedprox.mue"):
        make_config(tmp_path, fedprox={"mue": 1.0})


def test_the_config_names_fedprox_and_travels_with_its_section(tmp_path):
    from fedlora.config import FedLoraConfig

    cfg = make_config(tmp_path, fedprox={"mu": 0.01})
    again = FedLoraConfig.from_json(cfg.to_json())
    assert again.section("fedprox").mu == 0.01 and again.digest() == cfg.digest()
    assert make_config(tmp_path).section("fedprox").mu == 0.0  # absent: off, at its defaults
    assert "fedprox" not in make_config(tmp_path).to_dict()  # an unused plug-in leaves the digest as it was


def _run(tmp_path, mu: float, name: str):
    cfg = make_config(tmp_path / name, fedprox={"mu": mu}, federation={"num_clients": 3, "min_train_clients": 3})
    _, rows, grid = run_recorded(cfg, engine="inprocess")
    return rows, grid


def test_the_server_sends_mu_and_the_clients_stay_closer_to_the_global_model(tmp_path):
    """The contract is Flower's FedProx's: ``proximal-mu`` in every train message's config. And what
    it is for: with a large mu each client's update (its distance from the factors it received) shrinks."""
    from flwr.app import MessageType

    rows = {}
    for mu in (1e-9, 100.0):
        rows[mu], grid = _run(tmp_path, mu, f"mu{mu:g}")
        sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
        assert sent and {float(m.content["config"]["proximal-mu"]) for m in sent} == {mu}
        replies = [m for m in grid.train_replies() if not m.has_error()]
        dist = [float(m.content["metrics"]["fedprox-distance"]) for m in replies]
        rows[mu] = sum(dist) / len(dist)
    assert rows[100.0] < 0.5 * rows[1e-9]


def test_a_config_check_loads_neither_torch_nor_flower(tmp_path):
    """`fedlora config` (config load, plug-in discovery, validation, reference) stays light."""
    code = (
        "import sys; from fedlora.config import FedLoraConfig, reference_toml; "
        "cfg = FedLoraConfig.load(None, ['fedprox.mu=0.1']); assert 'mu = 0.1' in reference_toml(cfg); "
        "print(sorted(m for m in ('torch', 'flwr', 'transformers', 'opacus') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr

"""The client-state store, and the ClientApp's handling of private state (FedSA's B).

The ClientApp's real handlers are driven with real Flower Messages and Contexts, as a SuperNode
would drive them, without a server.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from conftest import make_config
from fedlora import codec
from fedlora.factors import extract_factors
from fedlora.state import ClientStateStore


def test_store_is_atomic_and_keyed_by_client(tmp_path, monkeypatch):
    store = ClientStateStore(tmp_path)
    store.save("client-1", "private", {"x": torch.ones(3)})
    store.save("client-2", "private", {"x": torch.zeros(3)})
    assert torch.equal(store.load("client-1", "private")["x"], torch.ones(3))
    assert store.clients() == ["client-1", "client-2"]

    # A crash while writing leaves the previous state intact and no stray temp file.
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    try:
        store.save("client-1", "private", {"x": torch.full((3,), 7.0)})
    except OSError:
        pass
    monkeypatch.undo()
    assert torch.equal(store.load("client-1", "private")["x"], torch.ones(3))
    assert [p.name for p in (tmp_path / "client-1").iterdir()] == ["private.safetensors"]


def test_store_never_unpickles_and_round_trips_factors_and_json(tmp_path):
    from fedlora.factors import LoraFactors, ModuleFactors

    store = ClientStateStore(tmp_path)
    f = LoraFactors(
        modules={"l.q": ModuleFactors(A=torch.randn(2, 3), B=torch.randn(4, 2), alpha=5.0)},
        extras={"classifier.weight": torch.randn(2, 3)},
    )
    store.save("c", "private", f)
    back = store.load("c", "private")
    assert torch.equal(back.modules["l.q"].A, f.modules["l.q"].A) and back.modules["l.q"].alpha == 5.0
    assert torch.equal(back.extras["classifier.weight"], f.extras["classifier.weight"])
    store.save("c", "rank", 6)
    assert store.load("c", "rank") == 6
    # A pickle planted where state lives is never executed: the store reads only safetensors and JSON.
    planted = tmp_path / "c" / "evil.pt"
    planted.write_bytes(b"not read")
    assert store.load("c", "evil") is None


def _context(partition: int, state=None) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=state if state is not None else RecordDict(),
        run_config={},
    )


def _setup(app, ctx, cfg):
    msg = Message(
        RecordDict({"config": ConfigRecord({"action": "setup", "run-config": cfg.to_json()})}),
        dst_node_id=ctx.node_id,
        message_type="query",
    )
    return app(msg, ctx)


def _train(app, ctx, cfg, arrays, rnd):
    msg = Message(
        RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd, "config-digest": cfg.digest()})}),
        dst_node_id=ctx.node_id,
        message_type="train",
    )
    return app(msg, ctx)


def _global_a(cfg):
    """What a FedSA server sends: A only, in the wire dtype."""
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors

    m = build_peft_model(
        cfg,
        4,
        AdapterSpec(
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
            dropout=cfg.lora.dropout,
            target_modules=tuple(cfg.lora.target_modules),
        ),
    )
    f = initial_factors(m, cfg.lora.init_seed)
    return codec.encode(f.select({"A"}), modules=sorted(f.modules))


def test_fedsa_private_b_survives_skipped_rounds_and_restarts(tmp_path, shared_data, task_identity):
    from fedlora import model as model_mod
    from fedlora.clients import session as session_mod
    from fedlora.clients.app import app

    cfg = make_config(tmp_path, federation={"strategy": "fedsa"}, simulation={"state_dir": str(tmp_path / "state")})
    store = ClientStateStore(tmp_path / "state")
    c0, c1 = _context(0), _context(1)
    prof = _setup(app, c0, cfg).content["profile"]
    assert prof["client_id"] == "client-00000" and prof["rank"] == 4 and prof["num_train"] > 0
    _setup(app, c1, cfg)
    a = _global_a(cfg)

    r0 = _train(app, c0, cfg, a, 1)
    r1 = _train(app, c1, cfg, a, 1)
    for reply in (r0, r1):
        keys = list(reply.content["arrays"].keys())
        assert keys and all(k.endswith("/A") for k in keys), keys  # B and head never leave
    b0 = store.load("client-00000", "private")
    b1 = store.load("client-00001", "private")
    # two clients trained different private B's and heads
    name = next(iter(b0.modules))
    assert not torch.equal(b0.modules[name].B, b1.modules[name].B)

    # client 0 trains again (round 2); client 1 skips it. Client 1's B is untouched...
    _train(app, c0, cfg, a, 2)
    assert torch.equal(store.load("client-00001", "private").modules[name].B, b1.modules[name].B)
    # ...and when client 1 is next sampled, its model starts from its own B, not client 0's.
    session = session_mod.ClientSession.from_context(c1, cfg.digest())
    model = session.model()
    session.prepare(model, a, 3)
    live = extract_factors(model)
    assert torch.equal(live.modules[name].B, b1.modules[name].B)
    assert torch.equal(live.extras["classifier.weight"], b1.extras["classifier.weight"])

    # A crashed client process: caches and node state are gone; its store on disk is not.
    session_mod._CONFIGS.clear()
    model_mod._PEFT_CACHE.clear()
    fresh = _context(1)
    _setup(app, fresh, cfg)
    session = session_mod.ClientSession.from_context(fresh, cfg.digest())
    model = session.model()
    session.prepare(model, a, 3)
    assert torch.equal(extract_factors(model).modules[name].B, b1.modules[name].B)


def test_train_without_setup_is_an_error(tmp_path, shared_data, task_identity):
    import pytest

    from fedlora.clients.app import app
    from fedlora.clients.session import SetupMissing

    cfg = make_config(tmp_path)
    with pytest.raises(SetupMissing, match="has not received the run configuration"):
        _train(app, _context(0), cfg, _global_a(cfg), 1)


def test_client_rejects_parts_its_policy_does_not_share(tmp_path, shared_data, task_identity):
    import pytest

    from fedlora.clients.app import app
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors

    cfg = make_config(tmp_path, federation={"strategy": "fedsa"}, simulation={"state_dir": str(tmp_path / "s")})
    ctx = _context(0)
    _setup(app, ctx, cfg)
    m = build_peft_model(cfg, 4, AdapterSpec(4, 8.0, cfg.lora.dropout, tuple(cfg.lora.target_modules)))
    f = initial_factors(m, 1)
    with_b = codec.encode(f.select({"A", "B"}), modules=sorted(f.modules))
    with pytest.raises(codec.CodecError, match=r"server sent parts \['B'\] that the fedsa policy"):
        _train(app, ctx, cfg, with_b, 1)

"""Whole federations of fedlora's ServerApp and ClientApps on real data from ../shared/data: on the
in-process grid where the apps' maths, shapes and wire content are tested, on Flower's simulation
engine (Ray) where the engine is."""

from __future__ import annotations

import re

import cloudpickle
import pytest
import torch

import fleet
from conftest import make_config
from fedlora import codec
from fedlora.config import FedLoraConfig
from fedlora.simulate import simulate

cloudpickle.register_pickle_by_value(fleet)

# Factor keys are module indices (both sides know the module list); the head is named.
FACTOR_KEY = re.compile(r"^(base/)?\d+/(A|B)$|^head/classifier\.(weight|bias)$")


_run = fleet.run_recorded


def _array_keys(messages):
    keys = []
    for m in messages:
        if m.has_error():
            continue
        for rec in m.content.array_records.values():
            keys.extend(rec.keys())
    return keys


def test_fedit_minilm_learns_real_data_and_saved_adapter_reloads(tmp_path, shared_data):
    """3 clients, 2 rounds of one local epoch, the real pretrained encoder, AG News from ../shared/data
    (accuracy 0.25 -> 0.60 on 120 held-out examples)."""
    cfg = make_config(
        tmp_path,
        model={"name": "builtin:all-MiniLM-L6-v2", "max_length": 32},
        data={"max_train_examples": 300, "max_test_examples": 120},
        train={"local_epochs": 1, "learning_rate": 3e-3},
        federation={"fraction_evaluate": 0.0},  # the server's evaluation is what this test reads
        run={"tensorboard": True},
    )
    run_dir, rows, grid = _run(cfg, engine="inprocess")  # learning and the saved adapter are the apps' doing
    assert rows[0]["round"] == 0 and rows[-1]["round"] == 2

    # run.tensorboard: every round's metrics are TensorBoard scalars, read back from the event files.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir.path / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"server/accuracy", "server/loss", "bytes/up-total", "clients/accepted"} <= tags, tags
    assert [(e.step, e.value) for e in board.Scalars("server/accuracy")] == [
        (r["round"], pytest.approx(r["server-accuracy"])) for r in rows
    ]
    assert [e.step for e in board.Scalars("bytes/up-total")] == [1, 2]
    assert rows[-1]["server-accuracy"] > rows[0]["server-accuracy"] + 0.15, [r["server-accuracy"] for r in rows]

    # Only LoRA factors and the head crossed the wire, in both directions, and the bytes add up.
    for key in _array_keys(grid.sent + grid.received):
        assert FACTOR_KEY.match(key), key
    for m in grid.received:
        if m.metadata.message_type == "train":
            rec = m.content["arrays"]
            assert codec.wire_bytes(rec) == rows[-1]["raw-factor-bytes-per-client"]

    # The saved adapter loads with PEFT and reproduces the server's final evaluation.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.data import load_task
    from fedlora.model import packaged_minilm_dir
    from fedlora.training import evaluate, predict

    torch.manual_seed(123)  # a different fresh head: the adapter must bring its own
    base = AutoModelForSequenceClassification.from_pretrained(packaged_minilm_dir(), num_labels=4)
    model = PeftModel.from_pretrained(base, str(run_dir.path / "adapter"))
    task = load_task(cfg)

    # The README's one line, as a user on another machine runs it: the adapter names its base by hub
    # id (resolved there; here, offline, the same weights are pointed at locally) and brings its labels.
    import json
    import shutil

    from peft import AutoPeftModelForSequenceClassification

    adapter_cfg = json.loads((run_dir.path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir.path / "adapter", elsewhere)
    adapter_cfg["base_model_name_or_path"] = str(packaged_minilm_dir())
    (elsewhere / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    d = str(elsewhere)
    names = json.load(open(f"{d}/labels.json"))["names"]  # the README's lines, as they are
    user_model = AutoPeftModelForSequenceClassification.from_pretrained(
        d, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    assert user_model.config.id2label == {0: "World", 1: "Sports", 2: "Business", 3: "Science or Technology"}
    user = evaluate(user_model, task.test, 64, torch.device("cpu"))
    from fedlora.model import load_adapter

    helper = load_adapter(run_dir.path / "adapter", base_model="builtin:all-MiniLM-L6-v2")
    assert helper.config.id2label[3] == "Science or Technology"
    assert evaluate(helper, task.test, 64, torch.device("cpu"))["accuracy"] == pytest.approx(user["accuracy"])
    assert user["accuracy"] == pytest.approx(rows[-1]["server-accuracy"], abs=1e-9)
    res = evaluate(model, task.test, 64, torch.device("cpu"))
    assert res["accuracy"] == pytest.approx(rows[-1]["server-accuracy"], abs=1e-9)
    assert res["loss"] == pytest.approx(rows[-1]["server-loss"], rel=1e-5)
    # Same predictions as the server's in-memory global model (the ServerApp runs in this process;
    # the model it evaluated and saved is the one cached for the run's base model).
    from fedlora import model as model_mod

    live = model_mod.cached_peft_model(
        cfg, 4, model_mod.AdapterSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.target_modules))
    )
    saved_logits = predict(model, task.test, 64, torch.device("cpu"))
    assert saved_logits.shape == (len(task.test), 4)
    assert torch.allclose(saved_logits, predict(live, task.test, 64, torch.device("cpu")), atol=1e-5)
    assert (run_dir.path / "plot.png").stat().st_size > 1000
    assert (run_dir.path / "config.toml").exists()


@pytest.mark.parametrize("strategy", ["fedit", "fedsa", "ffa"])
def test_wire_carries_only_what_the_policy_shares(tmp_path, shared_data, strategy):
    # On the in-process grid: what the messages carry is the apps' doing, not the engine's.
    cfg = make_config(tmp_path, federation={"strategy": strategy, "wire_dtype": "float32"})
    run_dir, rows, grid = _run(cfg, engine="inprocess")
    keys = _array_keys(grid.sent + grid.received)
    assert keys and all(FACTOR_KEY.match(k) for k in keys)
    if strategy == "fedsa":
        assert not [k for k in keys if k.endswith("/B") or k.startswith("head/")]
        # Each client's personalized adapter (global A + its own B and head) loads with PEFT.
        from peft import PeftModel

        from fedlora.factors import extract_factors
        from fedlora.model import _build_base
        from fedlora.state import ClientStateStore

        store = ClientStateStore(run_dir.path / "client_state")
        for cid in ("client-00000", "client-00002"):
            model = PeftModel.from_pretrained(_build_base(cfg, 4), str(run_dir.path / "adapters" / cid))
            private = store.load(cid, "private")
            live = extract_factors(model)
            name = next(iter(private.modules))
            assert torch.equal(live.modules[name].B, private.modules[name].B)
            assert torch.equal(live.extras["classifier.weight"], private.extras["classifier.weight"])
    if strategy == "ffa":
        assert not [k for k in keys if k.endswith("/A")]  # A is rebuilt from the seed, never sent
    up = rows[-1]["payload-up-per-client"]
    # tiny BERT: hidden 64, rank 4, query+value in 2 layers: A and B are 4 x 64 each
    factor_bytes = 2 * 2 * (4 * 64) * 4
    head_bytes = (4 * 64 + 4) * 4
    expected = {"fedit": 2 * factor_bytes + head_bytes, "fedsa": factor_bytes, "ffa": factor_bytes + head_bytes}
    assert up == expected[strategy]
    framing = rows[-1]["bytes-up-per-client"] - up
    assert 0 < framing < 2500, framing  # keys, shapes, metrics: small and bounded


def test_bad_replies_are_dropped_with_a_reason_and_the_round_goes_on(tmp_path, shared_data):
    cfg = make_config(tmp_path, federation={"strategy": "fedsa", "num_clients": 6, "min_train_clients": 6})
    app = fleet.hostile_app({1: "leak-b", 2: "nan", 3: "weight", 4: "shape", 5: "rank"})
    _, rows, _ = _run(cfg, client_app=app, engine="inprocess")  # the server's validation, on any engine
    for row in rows[1:]:
        assert row["clients-accepted"] == 1 and row["clients-sampled"] == 6
        text = " | ".join(row["rejected"])
        assert "client-00001" in text and "carries B" in text
        assert "client-00002" in text and "NaN" in text
        assert "client-00003" in text and "num-examples" in text
        assert "client-00004" in text and "shape (3, 64), expected (4, 64)" in text
        assert "client-00005" in text and "'rank'=5 is not in 1..4" in text
    assert rows[-1]["personal-accuracy-mean"] is not None


def test_mixed_ranks_are_refused_by_fedit(tmp_path, shared_data):
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="fedit cannot mix ranks .*averages factors of one rank"):
        make_config(tmp_path, hetero={"client_ranks": [2, 4, 4]})


def test_fedsa_refuses_mixed_ranks_with_the_reason():
    from fedlora.config import ConfigError

    with pytest.raises(ConfigError, match="fedsa cannot mix ranks \\[4, 8\\].*private B"):
        FedLoraConfig.load(
            None, ["federation.strategy=fedsa", "federation.num_clients=2", "hetero.client_ranks=[4, 8]"]
        )


@pytest.mark.parametrize("strategy", ["hetlora", "flexlora", "flora"])
def test_heterogeneous_ranks_each_client_gets_its_own_rank(tmp_path, shared_data, strategy):
    cfg = make_config(
        tmp_path,
        federation={"strategy": strategy},
        hetero={"client_ranks": [2, 4, 8], "flora_max_rank": 10},
        run={"rounds": 3},
    )
    _, rows, grid = _run(cfg, engine="inprocess")  # shapes are the apps' doing, not the engine's
    ranks = {}
    for m in grid.received:
        if m.metadata.message_type == "query" and not m.has_error():
            ranks[m.metadata.src_node_id] = int(m.content["profile"]["rank"])
    assert sorted(ranks.values()) == [2, 4, 8]
    for m in grid.sent:
        if m.metadata.message_type not in ("train", "evaluate"):
            continue
        r = ranks[m.metadata.dst_node_id]
        for key, arr in m.content["arrays"].items():
            if key.startswith("base/"):
                continue  # FLoRA's merged global delta has the stacked rank, by design
            if key.endswith("/A"):
                assert arr.shape[0] == r, (key, arr.shape, r)
            if key.endswith("/B"):
                assert arr.shape[1] == r, (key, arr.shape, r)
    for m in grid.received:
        if m.metadata.message_type == "train":
            a_keys = [k for k in m.content["arrays"].keys() if k.endswith("/A")]
            assert m.content["arrays"][a_keys[0]].shape[0] == ranks[m.metadata.src_node_id]
    assert all(not r.get("rejected") for r in rows)
    if strategy == "flora":
        assert [r["global-rank"] for r in rows] == [0, 10, 10, 10]  # 14 per round, capped at 10
    else:
        assert rows[-1]["global-rank"] == 8


def test_the_in_process_grid_runs_the_same_federation_as_flowers_engine(tmp_path, shared_data, monkeypatch):
    """fedlora's ServerApp and ClientApp on fedlora.inprocess.InProcessGrid (one process, no engine)
    give the run that Flower's simulation engine gives: the same global factors and the same metrics
    every round. So a test of maths, shapes or validation can use it and test the code that runs."""
    from fedlora.rundir import RunDir
    from fedlora.state import tensors_from_file

    cfg = make_config(tmp_path, federation={"num_clients": 3, "min_train_clients": 3, "min_evaluate_clients": 3})
    # Without RAY_ADDRESS, as a user runs it: the simulation starts a private Ray and stops it (the
    # suite's other engine test runs on the session's cluster, as a user's RAY_ADDRESS would have it).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_run = simulate(cfg, run_dir=RunDir(tmp_path / "ray"))
    import ray

    assert not ray.is_initialized()
    cfg2 = make_config(tmp_path, federation={"num_clients": 3, "min_train_clients": 3, "min_evaluate_clients": 3})
    local_run = simulate(cfg2, run_dir=RunDir(tmp_path / "local"), engine="inprocess")
    a = tensors_from_file(ray_run.path / "checkpoint" / "global.safetensors")[0]
    b = tensors_from_file(local_run.path / "checkpoint" / "global.safetensors")[0]
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    keys = ("round", "server-accuracy", "server-loss", "clients-accepted", "train-loss", "personal-accuracy-mean")
    ray_rows, local_rows = ray_run.read_metrics(), local_run.read_metrics()
    assert [r["round"] for r in local_rows] == [0, 1, 2]
    for x, y in zip(ray_rows, local_rows):
        for key in keys:
            assert x.get(key) == pytest.approx(y.get(key), abs=1e-6), (x["round"], key)

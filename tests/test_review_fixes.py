"""One test per defect and friction point found in review (issue: what exists, made right).

Each fails on the code before the fix."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from conftest import make_config
from fedlora.config import FedLoraConfig

ROOT = Path(__file__).resolve().parents[1]


# 1. HetLoRA self-pruning under alpha_mode = "fixed" ------------------------------------------
def test_pruned_client_sends_its_real_update_not_an_inflated_one(tmp_path, shared_data, task_identity):
    from fedlora.clients.app import app
    from fedlora.clients.session import ClientSession
    from fedlora.factors import LoraFactors, ModuleFactors, load_factors
    from fedlora.lora_math import to_effective

    cfg = make_config(tmp_path, federation={"strategy": "hetlora"}, lora={"rank": 8, "alpha": 16},
                      hetero={"hetlora_prune": True, "hetlora_prune_ratio": 0.02, "client_ranks": [8, 8, 8]},
                      simulation={"state_dir": str(tmp_path / "state")})
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    app(Message(RecordDict({"config": ConfigRecord({"action": "setup", "run-config": cfg.to_json()})}),
                dst_node_id=7, message_type="query"), ctx)
    session = ClientSession.from_context(ctx, cfg.digest())
    model = session.model()
    g = torch.Generator().manual_seed(0)
    trained = LoraFactors()
    from fedlora.factors import extract_factors

    before = extract_factors(model)
    for name, m in before.modules.items():
        B = torch.randn(m.B.shape, generator=g)
        B[:, 6:] *= 1e-3  # the last two components carry almost nothing: they are pruned
        trained.modules[name] = ModuleFactors(A=torch.randn(m.A.shape, generator=g), B=B, alpha=m.alpha)
    load_factors(model, trained)
    sent = session.finish_training(model)
    assert {m.rank for m in sent.modules.values()} == {6}
    for name, m in trained.modules.items():
        real = m.scaling * (m.B[:, :6].double() @ m.A[:6].double())
        got = to_effective(sent).modules[name]
        assert torch.allclose(got.B.double() @ got.A.double(), real, rtol=1e-5, atol=1e-6)
    assert session.store.load(session.profile.client_id, "rank") == 6


def test_server_takes_a_pruned_reply_at_its_real_scale():
    from test_strategy_maths import _reply, _template

    from fedlora.lora_math import prune_to_rank, to_effective
    from fedlora.protocol import NodeProfile

    cfg = FedLoraConfig.load(None, ["federation.strategy=hetlora", "lora.rank=8", "lora.alpha=16",
                                    "hetero.hetlora_prune=true"])
    from fedlora.strategies import HetLoRA

    tmpl = _template(8)
    s = HetLoRA(cfg, tmpl)
    prof = NodeProfile(1, "c", 0, 8, 16.0, 100, 10)
    g = torch.Generator().manual_seed(1)
    f = tmpl.clone()
    for m in f.modules.values():
        m.B = torch.randn(m.B.shape, generator=g)
        m.alpha = 16.0
    pruned = prune_to_rank(f, 6, cfg.lora.alpha_for_rank(6))
    u = s.validate_reply(prof, _reply(s, pruned, 10, 6))
    assert prof.rank == 6
    for name, m in f.modules.items():
        eff = to_effective(u.factors).modules[name]
        want = m.scaling * (m.B[:, :6].double() @ m.A[:6].double())
        assert torch.allclose(eff.B.double() @ eff.A.double(), want, rtol=1e-5, atol=1e-5)


# 2. Process-wide side effects and unbounded caches --------------------------------------------
def test_building_a_model_leaves_the_callers_rng_alone(tmp_path):
    from fedlora.model import AdapterSpec, build_peft_model

    cfg = FedLoraConfig.load(None, ["model.name=builtin:tiny-bert"])
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_peft_model(cfg, 3, AdapterSpec(2, 4.0, 0.0, ("query",)))
    assert torch.equal(torch.rand(3), expected)


def test_model_cache_is_bounded_and_keeps_no_orphan_weights():
    from fedlora import model as model_mod
    from fedlora.model import AdapterSpec, build_peft_model

    cfg = FedLoraConfig.load(None, ["model.name=builtin:tiny-bert"])
    for r in range(1, 8):
        build_peft_model(cfg, 3, AdapterSpec(r, 4.0, 0.0, ("query",)))
    assert len(model_mod._PEFT_CACHE) <= model_mod._PEFT_CACHE.maxsize == 4
    assert not hasattr(model_mod, "_PRISTINE") and not hasattr(model_mod, "_BASE_CACHE")


def test_process_caches_are_bounded():
    from fedlora import data, partitions
    from fedlora.clients import session

    for cache in (data._TASK_CACHE, partitions._PARTITION_CACHE, partitions._LOCAL_CACHE, session._CONFIGS):
        for i in range(50):
            cache[("k", i)] = i
        assert len(cache) == cache.maxsize < 50


def test_tokenized_cache_write_cannot_collide_with_another_worker(tmp_path, shared_data):
    from fedlora import data

    cfg = make_config(tmp_path, model={"cache_dir": str(tmp_path / "cache")})
    # Another worker's temporary file (the old fixed '<key>.tmp' name) is in the way.
    tok = tmp_path / "cache" / "tokenized"
    tok.mkdir(parents=True)
    data._TASK_CACHE.clear()
    key_probe = data.load_task(cfg)  # writes the cache
    (cached,) = list(tok.glob("*.safetensors"))
    cached.unlink()
    (tok / (cached.stem + ".tmp")).mkdir()  # a directory where a fixed temp name would go
    data._TASK_CACHE.clear()
    again = data.load_task(cfg)
    assert torch.equal(again.test.labels, key_probe.test.labels) and cached.exists()
    assert not [p for p in tok.iterdir() if p.name.startswith(".")]  # no temp file left behind


# 3. Claims the code does not keep -------------------------------------------------------------
def test_docstrings_name_only_functions_that_exist():
    import importlib

    missing = []
    for mod_name in ("fedlora.model", "fedlora.state", "fedlora.lora_math", "fedlora.codec", "fedlora.factors",
                     "fedlora.clients.session", "fedlora.strategies.base", "fedlora.data"):
        mod = importlib.import_module(mod_name)
        for ref in re.findall(r":(?:func|class):`~?([\w.]+)`", mod.__doc__ or ""):
            target = ref.rsplit(".", 1)
            owner = importlib.import_module(target[0]) if len(target) == 2 and target[0].startswith("fedlora") else mod
            if not hasattr(owner, target[-1]):
                missing.append(f"{mod_name}: {ref}")
    assert not missing, missing


def test_nothing_claims_optimizer_state_is_kept():
    for path in (ROOT / "README.md", ROOT / "fedlora" / "state.py"):
        text = path.read_text()
        claims = [line for line in text.splitlines() if "optimizer state" in line.lower() and "not" not in line.lower()]
        assert not claims, (path, claims)


def test_config_docstring_promises_no_data_location_in_node_config():
    import fedlora.config

    assert "data location" not in fedlora.config.__doc__


# 5. The adapter is usable elsewhere -----------------------------------------------------------
def test_saved_adapter_carries_labels_and_a_portable_base_reference(tmp_path):
    from fedlora.model import LABELS_FILE, AdapterSpec, build_peft_model, portable_reference, save_adapter

    cfg = FedLoraConfig.load(None, ["model.name=builtin:tiny-bert"])
    m = build_peft_model(cfg, 3, AdapterSpec(2, 4.0, 0.0, ("query",)))
    save_adapter(m, tmp_path / "a", "builtin:all-MiniLM-L6-v2", ["x", "y", "z"])
    adapter_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "/.cache/" not in json.dumps(adapter_cfg)
    labels = json.loads((tmp_path / "a" / LABELS_FILE).read_text())
    assert labels == {"names": ["x", "y", "z"], "id2label": {"0": "x", "1": "y", "2": "z"},
                      "label2id": {"x": 0, "y": 1, "z": 2}}
    assert portable_reference("my/model") == "my/model"


# 6-8. A new user's friction --------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "COLUMNS": "200"})


def test_config_reference_is_the_embedded_default_as_toml():
    import tomllib

    out = _cli("config", "--reference")
    assert out.returncode == 0, out.stderr
    from fedlora.registry import plugin_sections

    parsed = tomllib.loads(out.stdout)
    default = FedLoraConfig.load()
    core = {k: v for k, v in parsed.items() if k not in plugin_sections()}
    assert core == json.loads(json.dumps(default.to_dict()))
    assert set(parsed) - set(core) == set(plugin_sections())  # every plug-in's keys, at their defaults
    assert parsed["train"]["learning_rate"] == default.train.learning_rate
    assert parsed["federation"]["evaluate_every"] == default.federation.evaluate_every
    assert "True" not in out.stdout and "# Number of federated rounds." in out.stdout


def test_help_points_to_the_reference_and_documents_every_option():
    sim = _cli("simulate", "--help").stdout
    assert "fedlora config --reference" in " ".join(sim.split())
    conf = " ".join(_cli("config", "--help").stdout.split())
    assert "TOML run config to validate" in conf and "Override a key" in conf


def test_run_name_follows_dataset_and_strategy():
    assert FedLoraConfig.load().run_name() == "fortunes-fedit"
    assert FedLoraConfig.load(None, ["federation.strategy=fedsa"]).run_name() == "fortunes-fedsa"
    cfg = FedLoraConfig.load(None, ['data.dataset="../shared/data/agnews/"', "federation.strategy=ffa"])
    assert cfg.run_name() == "agnews-ffa"
    assert FedLoraConfig.load(None, ['run.name="mine"']).run_name() == "mine"


def test_plot_has_integer_round_ticks_and_baselines(tmp_path):
    from fedlora.rundir import RunDir
    from fedlora.server.evaluation import accuracy_baselines

    rd = RunDir(tmp_path)
    for r in range(3):
        rd.append_metrics({"round": r, "server-accuracy": 0.3 + 0.1 * r, "bytes-up-total": 10})
    base = accuracy_baselines(torch.tensor([0, 0, 0, 1, 2, 3]), 4)
    assert base == {"chance": 0.25, "majority class": 0.5}
    import matplotlib.pyplot as plt

    seen = {}
    orig = plt.Figure.savefig

    def spy(fig, *a, **k):
        ax = fig.axes[0]
        seen["ticks"] = [t for t in ax.get_xticks() if 0 <= t <= 2]
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return orig(fig, *a, **k)

    plt.Figure.savefig = spy
    try:
        rd.plot(base)
    finally:
        plt.Figure.savefig = orig
    assert all(float(t).is_integer() for t in seen["ticks"])
    assert any("chance" in t for t in seen["labels"]) and any("majority" in t for t in seen["labels"])


def test_model_build_and_partitioning_are_quiet(tmp_path, shared_data, capfd):
    from fedlora import model as model_mod
    from fedlora.data import load_task
    from fedlora.model import AdapterSpec, build_peft_model
    from fedlora.partitions import partition_indices

    model_mod._PEFT_CACHE.clear()
    cfg = make_config(tmp_path, model={"name": "builtin:all-MiniLM-L6-v2"},
                      data={"partitioner": "dirichlet", "min_partition_size": 10})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_peft_model(cfg, 4, AdapterSpec(4, 8.0, 0.0, ("query", "value")))
        partition_indices(cfg, load_task(cfg).train_labels)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err and "Loading weights" not in out + err
    noisy = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))]
    assert not noisy, noisy


# The strategy's state is checkpointed atomically after every round (the seam resume builds on) --
def test_strategy_state_round_trips_through_an_atomic_checkpoint(tmp_path):
    from test_strategy_maths import _setup

    from fedlora.rundir import RunDir

    cfg, s, profiles, template = _setup("hetlora", "fixed", [2, 4, 8], **{"privacy.client_dp": "true",
                                                                         "privacy.noise_seed": 1})
    s.refused[999] = "lied"
    from fedlora.strategies.base import RoundLog

    s.rounds[1] = RoundLog(server_round=1)
    rd = RunDir(tmp_path)
    rd.write_checkpoint(*s.state_dict())
    tensors, state = rd.read_checkpoint()
    _, again, _, _ = _setup("hetlora", "fixed", [2, 4, 8], **{"privacy.client_dp": "true"})
    again.load_state_dict(tensors, state)
    assert {k: v.to_record() for k, v in again.profiles.items()} == {k: v.to_record() for k, v in s.profiles.items()}
    assert again.refused == {999: "lied"} and state["last-round"] == 1
    for (k1, a), (k2, b) in zip(again.global_eff.tensors(), s.global_eff.tensors()):
        assert k1 == k2 and torch.equal(a, b)
    # a torn checkpoint (tensors replaced after the state was written) is detected, not loaded
    (tmp_path / "checkpoint" / "global.safetensors").write_bytes(b"torn")
    with pytest.raises(ValueError, match="torn"):
        rd.read_checkpoint()

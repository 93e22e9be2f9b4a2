"""The model builder (fedlora/model.py): its caches, its RNG hygiene, the adapter it saves, its quiet."""

from __future__ import annotations

import json
import warnings

import torch

from conftest import make_config
from fedlora.config import FedLoraConfig


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


def test_saved_adapter_carries_labels_and_a_portable_base_reference(tmp_path):
    from fedlora.model import LABELS_FILE, AdapterSpec, build_peft_model, portable_reference, save_adapter

    cfg = FedLoraConfig.load(None, ["model.name=builtin:tiny-bert"])
    m = build_peft_model(cfg, 3, AdapterSpec(2, 4.0, 0.0, ("query",)))
    save_adapter(m, tmp_path / "a", "builtin:all-MiniLM-L6-v2", ["x", "y", "z"])
    adapter_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "/.cache/" not in json.dumps(adapter_cfg)
    labels = json.loads((tmp_path / "a" / LABELS_FILE).read_text())
    assert labels == {
        "names": ["x", "y", "z"],
        "id2label": {"0": "x", "1": "y", "2": "z"},
        "label2id": {"x": 0, "y": 1, "z": 2},
    }
    assert portable_reference("my/model") == "my/model"


def test_model_build_and_partitioning_are_quiet(tmp_path, shared_data, capfd):
    from fedlora import model as model_mod
    from fedlora.data import load_task
    from fedlora.model import AdapterSpec, build_peft_model
    from fedlora.partitions import partition_indices

    model_mod._PEFT_CACHE.clear()
    cfg = make_config(
        tmp_path,
        model={"name": "builtin:all-MiniLM-L6-v2"},
        data={"partitioner": "dirichlet", "min_partition_size": 10},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_peft_model(cfg, 4, AdapterSpec(4, 8.0, 0.0, ("query", "value")))
        partition_indices(cfg, load_task(cfg).train_labels)
    out, err = capfd.readouterr()
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err and "Loading weights" not in out + err
    noisy = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, UserWarning))]
    assert not noisy, noisy

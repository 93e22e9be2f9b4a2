"""Data: the builtin fortunes task, local files, flwr-datasets partitions."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import make_config
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.data import FORTUNE_COLLECTIONS, fortune_dir, load_task, read_fortunes
from fedlora.partitions import client_data, partition_indices


def test_fortunes_builtin_task_is_balanced_enough(tmp_path):
    cfg = FedLoraConfig.load(None, [f'model.cache_dir="{tmp_path}"'])
    task = load_task(cfg)
    total = len(task.train) + len(task.test)
    assert 2200 <= total <= 2400
    counts = Counter(task.train_labels)
    assert max(counts.values()) / len(task.train) < 0.40  # no collection dominates
    assert task.label_names == list(FORTUNE_COLLECTIONS)
    assert not any((fortune_dir() / "fortunes-o").name in n for n in task.label_names)
    # entries are real multi-line texts separated by '%'
    assert len(read_fortunes(fortune_dir() / "startrek")) == 203


def test_local_folder_labels_follow_labels_json(tmp_path, shared_data):
    cfg = make_config(tmp_path)
    task = load_task(cfg)
    assert task.label_names == ["World", "Sports", "Business", "Science or Technology"]
    assert len(task.train) == 240 and len(task.test) == 120


def test_partitions_are_deterministic_and_disjoint(tmp_path, shared_data):
    cfg = make_config(
        tmp_path,
        data={"partitioner": "dirichlet", "dirichlet_alpha": 0.5, "min_partition_size": 5},
        federation={"num_clients": 4},
    )
    labels = load_task(cfg).train_labels
    a = partition_indices(cfg, labels)
    from fedlora import partitions as d

    d._PARTITION_CACHE.clear()
    b = partition_indices(cfg, labels)
    assert a == b
    flat = [i for p in a for i in p]
    assert len(flat) == len(set(flat))


def test_pathological_split_gives_k_labels(tmp_path, shared_data):
    cfg = make_config(
        tmp_path, data={"partitioner": "pathological", "labels_per_client": 2}, federation={"num_clients": 4}
    )
    task = load_task(cfg)
    for p in partition_indices(cfg, task.train_labels):
        assert len({task.train_labels[i] for i in p}) <= 2


def test_sizes_split_gives_each_client_its_share_of_shuffled_rows_and_refuses_a_wrong_count(tmp_path, shared_data):
    cfg = make_config(
        tmp_path, data={"partitioner": "sizes", "partition_sizes": [4, 1, 1]}, federation={"num_clients": 3}
    )
    task = load_task(cfg)
    parts = partition_indices(cfg, task.train_labels)
    assert [len(p) for p in parts] == [160, 40, 40]  # 240 rows in shares 4:1:1
    assert len({i for p in parts for i in p}) == 240
    assert parts[0] != list(range(160))  # shuffled by the run's seed: not the file's first rows
    assert len({task.train_labels[i] for i in parts[1]}) == 4  # an IID sample holds every label
    with pytest.raises(ConfigError, match="data.partition_sizes.*2 shares for 3 clients"):
        make_config(tmp_path, data={"partitioner": "sizes", "partition_sizes": [4, 1]}, federation={"num_clients": 3})
    with pytest.raises(ConfigError, match="data.partition_sizes.*> 0"):
        make_config(tmp_path, data={"partitioner": "sizes", "partition_sizes": [4, 0, 1]})


def test_client_local_split(tmp_path, shared_data):
    cfg = make_config(tmp_path)
    cd = client_data(cfg, 1)
    assert len(cd.train) > 0 and len(cd.test) > 0
    assert abs(len(cd.test) / (len(cd.train) + len(cd.test)) - 0.2) < 0.05


def test_a_new_task_type_plugs_in_through_the_registry_without_editing_the_core(tmp_path, shared_data):
    """A task type registered by name is what model.task may say, and the core's data, training loop
    and evaluation use its encoding, loss and scoring (here: classification with label smoothing)."""
    import torch.nn.functional as F

    from fedlora.config import ConfigError
    from fedlora.model import AdapterSpec, build_peft_model
    from fedlora.registry import register_task_type, task_type, task_type_names
    from fedlora.tasks.classification import Classification
    from fedlora.training import evaluate, train_local

    with pytest.raises(ConfigError, match="model.task.*must be one of classification, causal-lm"):
        make_config(tmp_path, model={"task": "smoothed-classification"})
    losses: list[float] = []

    class Smoothed(Classification):
        def loss(self, outputs, labels):
            out = F.cross_entropy(outputs.logits, labels, label_smoothing=0.2)
            losses.append(float(out))
            return out

    register_task_type("smoothed-classification", Smoothed())
    assert "smoothed-classification" in task_type_names() and task_type("classification") is not None
    cfg = make_config(tmp_path, model={"task": "smoothed-classification"})
    task = load_task(cfg)
    assert task.train.task == "smoothed-classification"
    part = client_data(cfg, 0)
    assert part.train.task == part.test.task == "smoothed-classification"  # a partition keeps its task
    model = build_peft_model(cfg, len(task.label_names), AdapterSpec.for_rank(cfg, cfg.lora.rank))
    params = [p for p in model.parameters() if p.requires_grad]
    res = train_local(model, params, part.train, cfg.train, seed=1, device=torch.device("cpu"))
    assert len(losses) == res.steps > 0  # the registered loss is the one the loop minimised
    assert 0.0 <= evaluate(model, part.test, 16, torch.device("cpu"))["accuracy"] <= 1.0


def test_a_local_dataset_path_that_does_not_exist_is_named_before_any_run_directory(tmp_path, monkeypatch):
    """A relative path is taken from the working folder; when nothing is there the error says so, names
    the key, and comes before a run directory or a hub lookup (which answered about a rewritten path)."""
    from fedlora.config import ConfigError
    from fedlora.simulate import simulate

    monkeypatch.chdir(tmp_path)
    cfg = make_config(tmp_path, data={"dataset": "../no-such-data/agnews"})
    with pytest.raises(
        ConfigError,
        match=r"'data.dataset': \.\./no-such-data/agnews does not exist on this machine "
        rf"\(relative paths are taken from the folder fedlora runs in, {tmp_path}\)",
    ):
        simulate(cfg)
    assert not (tmp_path / "runs").exists()
    cfg = make_config(tmp_path, data={"dataset": "", "data_files": {"train": [str(tmp_path / "a.jsonl")]}})
    with pytest.raises(ConfigError, match=r"'data.data_files.train': .*a.jsonl does not exist"):
        simulate(cfg)


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

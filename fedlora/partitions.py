"""Who holds what: each client's partition of the run's dataset (flwr-datasets partitioners,
deterministic by seed), its local train/test/validation parts, a device's own data mapped onto the
run's labels, and the server's validation set (the union of the clients' validation parts)."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

from fedlora.cache import BoundedCache
from fedlora.config import ConfigError, FedLoraConfig
from fedlora.data import Examples, _encode, _examples, _rows_from_hf, load_task
from fedlora.model_sources import cache_root, load_tokenizer
from fedlora.registry import task_type
from fedlora.state import atomic_write_bytes

# ---------------------------------------------------------------------------------------------
# partitions
# ---------------------------------------------------------------------------------------------
_PARTITION_CACHE: BoundedCache[list[list[int]]] = BoundedCache(8)


def partition_indices(cfg: FedLoraConfig, labels: list[int]) -> list[list[int]]:
    """Indices of each client's partition, from flwr-datasets partitioners, deterministic by seed."""
    n, dc, seed = cfg.federation.num_clients, cfg.data, cfg.run.seed
    key = (
        n,
        dc.partitioner,
        dc.dirichlet_alpha,
        dc.labels_per_client,
        dc.min_partition_size,
        tuple(dc.partition_sizes),
        seed,
        len(labels),
        hashlib.sha256(bytes(str(labels), "utf8")).hexdigest(),
    )
    if key in _PARTITION_CACHE:
        return _PARTITION_CACHE[key]
    if n > len(labels):
        raise ConfigError(
            f"invalid config value for 'federation.num_clients': {n} clients but only "
            f"{len(labels)} training examples; every client needs at least one"
        )
    stored = _partition_file(cfg, key)
    parts = _read_partitions(stored, n)
    if parts is None:
        parts = _split(cfg, labels)
        atomic_write_bytes(stored, json.dumps(parts).encode())
    _PARTITION_CACHE[key] = parts
    return parts


def _partition_file(cfg: FedLoraConfig, key: tuple) -> Path:
    """Where the partitions for ``key`` are kept on disk. The driver of a simulation splits once; the
    worker processes read the file instead of importing `datasets` and flwr-datasets again (about 2 s
    a process). The partitioner's version is part of the key: another version may split differently."""
    from importlib.metadata import version

    digest = hashlib.sha256(json.dumps([list(key), version("flwr-datasets")]).encode()).hexdigest()[:32]
    return cache_root(cfg.model.cache_dir) / "partitions" / f"{digest}.json"


def _read_partitions(path: Path, n: int) -> list[list[int]] | None:
    """The stored partitions, or None when absent or not ``n`` lists of indices (then split again)."""
    try:
        parts = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(parts, list)
        and len(parts) == n
        and all(isinstance(p, list) and all(isinstance(i, int) for i in p) for p in parts)
    )
    return parts if ok else None


def _split(cfg: FedLoraConfig, labels: list[int]) -> list[list[int]]:
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner, SizePartitioner

    n, dc, seed = cfg.federation.num_clients, cfg.data, cfg.run.seed
    ds = Dataset.from_dict({"label": labels, "idx": list(range(len(labels)))})
    if dc.partitioner == "iid":
        p = IidPartitioner(num_partitions=n)
    elif dc.partitioner == "sizes":
        total = sum(dc.partition_sizes)
        # SizePartitioner hands out contiguous rows: shuffled first, every client's rows are an IID sample.
        ds = ds.shuffle(seed=seed)
        p = SizePartitioner(partition_sizes=[int(len(labels) * w / total) for w in dc.partition_sizes])
    elif dc.partitioner == "dirichlet":
        p = DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=dc.dirichlet_alpha,
            seed=seed,
            min_partition_size=min(dc.min_partition_size, len(labels) // n),
        )
    else:
        num_labels = len(set(labels))
        if dc.labels_per_client > num_labels:
            raise ConfigError(
                f"invalid config value for 'data.labels_per_client': {dc.labels_per_client} "
                f"but the dataset has {num_labels} labels"
            )
        p = PathologicalPartitioner(
            num_partitions=n,
            partition_by="label",
            num_classes_per_partition=dc.labels_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    p.dataset = ds
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns whenever min_partition_size is left at its default; ours is explicit.
            warnings.filterwarnings("ignore", message=".*min_partition_size.*")
            # 'sizes' leaves out the rows its shares round away (a documented remainder).
            warnings.filterwarnings("ignore", message=".*sum of partition sizes.*")
            parts = [list(p.load_partition(i)["idx"]) for i in range(n)]
    except ValueError as exc:
        raise ConfigError(
            f"cannot split {len(labels)} examples over {n} clients with the {dc.partitioner} partitioner: {exc}"
        ) from None
    empty = [i for i, part in enumerate(parts) if len(part) < 2]
    if empty:
        raise ConfigError(
            f"invalid config value for 'federation.num_clients': clients {empty[:5]} get fewer than "
            f"2 examples ({len(labels)} examples over {n} clients with {dc.partitioner})"
        )
    return parts


@dataclass
class ClientData:
    train: Examples
    test: Examples
    val: Examples | None = None  # only with data.validation_fraction > 0


def client_data(cfg: FedLoraConfig, partition_id: int) -> ClientData:
    """Client ``partition_id``'s local train, local test (and local validation) split."""
    task = load_task(cfg)
    parts = partition_indices(cfg, task.train_labels)
    if not 0 <= partition_id < len(parts):
        raise ConfigError(f"partition-id {partition_id} is outside 0..{len(parts) - 1}")
    idx = list(parts[partition_id])
    random.Random(cfg.run.seed * 1000 + partition_id).shuffle(idx)
    k = max(1, round(len(idx) * cfg.data.local_test_fraction))
    test, rest = idx[:k], idx[k:]
    val = None
    if cfg.data.validation_fraction > 0:
        v = max(1, round(len(idx) * cfg.data.validation_fraction))
        val, rest = task.train.subset(rest[:v]), rest[v:]
    return ClientData(train=task.train.subset(rest), test=task.train.subset(test), val=val)


_LOCAL_CACHE: BoundedCache[ClientData] = BoundedCache(2)


def local_client_data(cfg: FedLoraConfig, path: str | Path, label_names: list[str]) -> ClientData:
    """A deployed client's own data: a folder (``train.jsonl``, optional ``test.jsonl``, or .csv/
    .json/.parquet) or one file on the device, with the run's column names; labels (names or
    indices) are mapped onto the run's ``label_names``. Without a test file, a local test split is
    carved out as in simulation."""
    src = Path(path).expanduser().resolve()
    if not src.exists():
        raise ConfigError(f"client data {src} does not exist")
    files = sorted(src.iterdir()) if src.is_dir() else [src]
    stamp = [(f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files]  # edited files are re-read
    key = json.dumps(
        [str(src), stamp, cfg.to_dict()["data"], cfg.model.name, cfg.model.max_length, label_names, cfg.run.seed],
        sort_keys=True,
    )
    if key in _LOCAL_CACHE:
        return _LOCAL_CACHE[key]
    dc = replace(cfg.data, dataset=str(src), data_files={})
    train_rows, test_rows, _ = _rows_from_hf(dc, cache_root(cfg.model.cache_dir), cfg.run.seed, label_names, cfg)
    rng = random.Random(cfg.run.seed)
    rng.shuffle(train_rows)
    val_rows: list[dict] = []
    if cfg.data.validation_fraction > 0:
        v = max(1, round(len(train_rows) * cfg.data.validation_fraction))
        val_rows, train_rows = train_rows[:v], train_rows[v:]
    if not train_rows or not test_rows:
        raise ConfigError(
            f"client data {src}: {len(train_rows)} training and {len(test_rows)} test examples; a client needs both"
        )
    tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)

    answers = task_type(cfg.model.task).answers(cfg, label_names)

    def examples(rows: list[dict]) -> Examples:
        return _examples(_encode(tok, rows, cfg, label_names), answers, cfg.model.task)

    out = ClientData(train=examples(train_rows), test=examples(test_rows), val=examples(val_rows) if val_rows else None)
    _LOCAL_CACHE[key] = out
    return out


def server_validation(cfg: FedLoraConfig) -> Examples | None:
    """The union of the clients' local validation parts: what the server scores the global adapter
    on when choosing hyper-parameters (never the held-out test split)."""
    if cfg.data.validation_fraction <= 0:
        return None
    parts = [client_data(cfg, i).val for i in range(cfg.federation.num_clients)]
    return Examples.concat([p for p in parts if p is not None])

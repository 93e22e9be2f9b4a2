"""Per-client state that survives between rounds, on disk, written atomically.

What lives here: FedSA's private B and head, a self-pruned HetLoRA rank, and (next waves)
O-LoRA's earlier tasks and a DP accountant. One directory per client identity; one file per
named entry. In simulation every virtual client's state is on disk, so 1000 clients do not grow
the process. The optimizer is *not* kept: every round starts from factors the server just
replaced, so moments accumulated at last round's point would steer this round's steps wrongly.

Nothing here runs code from the files it reads: factors and tensors are stored as safetensors,
everything else as JSON (a pickle planted in a state directory could run anything on load).
Writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d over the
old file: a crash leaves either the old or the new state, never a torn file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedlora.factors import LoraFactors

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
_TENSORS, _JSON = ".safetensors", ".json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def tensors_from_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


OWN_RANK = "rank"  # a client's store entry: the rank it trains at when it lowered its own (HetLoRA's pruning)


class ClientStateStore:
    """``save(client, name, value)`` / ``load(client, name, default)``; values are
    :class:`~fedlora.factors.LoraFactors`, a ``dict`` of tensors, or anything JSON holds."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _dir(self, client_id: str) -> Path:
        return self.root / _SAFE.sub("_", str(client_id))

    def _path(self, client_id: str, name: str, suffix: str) -> Path:
        return self._dir(client_id) / f"{_SAFE.sub('_', name)}{suffix}"

    def save(self, client_id: str, name: str, value: Any) -> Path:
        if isinstance(value, LoraFactors):
            alpha = {n: m.alpha for n, m in value.modules.items()}
            data = tensors_to_bytes(dict(value.tensors()), {"kind": "lora-factors", "alpha": json.dumps(alpha)})
            path, stale = self._path(client_id, name, _TENSORS), self._path(client_id, name, _JSON)
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            data = tensors_to_bytes(value, {"kind": "tensors"})
            path, stale = self._path(client_id, name, _TENSORS), self._path(client_id, name, _JSON)
        else:
            try:
                data = json.dumps(value, sort_keys=True).encode()
            except TypeError as exc:
                raise TypeError(f"client state {name!r} must be LoraFactors, tensors or JSON data: {exc}") from None
            path, stale = self._path(client_id, name, _JSON), self._path(client_id, name, _TENSORS)
        atomic_write_bytes(path, data)
        stale.unlink(missing_ok=True)
        return path

    def load(self, client_id: str, name: str, default: Any = None) -> Any:
        tpath, jpath = self._path(client_id, name, _TENSORS), self._path(client_id, name, _JSON)
        if tpath.exists():
            tensors, meta = tensors_from_file(tpath)
            if meta.get("kind") == "lora-factors":
                return LoraFactors.from_tensors(tensors, json.loads(meta["alpha"]))
            return tensors
        if jpath.exists():
            return json.loads(jpath.read_text())
        return default

    def has(self, client_id: str, name: str) -> bool:
        return self._path(client_id, name, _TENSORS).exists() or self._path(client_id, name, _JSON).exists()

    def clients(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

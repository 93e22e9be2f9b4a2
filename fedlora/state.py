"""Per-client state that survives between rounds, on disk, written atomically.

What lives here: FedSA's private B and head, optimizer state, and (next waves) O-LoRA's earlier
tasks and a DP accountant. One directory per client identity; one file per named entry. In
simulation every virtual client's state is on disk, so 1000 clients do not grow the process.

Writes go to a temporary file in the same directory, are fsynced, then ``os.replace``d over the
old file: a crash leaves either the old or the new state, never a torn file.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class ClientStateStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _path(self, client_id: str, name: str) -> Path:
        return self.root / _SAFE.sub("_", str(client_id)) / f"{_SAFE.sub('_', name)}.pt"

    def save(self, client_id: str, name: str, value: Any) -> Path:
        path = self._path(client_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(value, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, client_id: str, name: str, default: Any = None) -> Any:
        path = self._path(client_id, name)
        if not path.exists():
            return default
        return torch.load(path, map_location="cpu", weights_only=False)

    def has(self, client_id: str, name: str) -> bool:
        return self._path(client_id, name).exists()

    def clients(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

"""fedlora's strategies (installed as ``fedlora.strategies``): one file, one registered class each.

Every strategy subclasses :class:`~fedlora.strategies.base.LoraStrategy` (on Flower's ``FedAvg``).
:data:`BUILTIN` is what the rest of fedlora may know of a built-in strategy without loading
Flower or torch (``fedlora config`` validates a run with it): the module that registers it and
its :class:`~fedlora.sharing.SharingPolicy`, which the registration gives the class. The factor
maths live in :mod:`fedlora.lora_math`.
"""

from __future__ import annotations

import importlib

from fedlora.sharing import SharingPolicy

_ALL = frozenset({"A", "B", "head"})

# name -> (module registering it, what it shares, keeps private and freezes)
BUILTIN: dict[str, tuple[str, SharingPolicy]] = {
    "fedit": ("fedlora.strategies.fedit", SharingPolicy(shared=_ALL)),
    "fedsa": ("fedlora.strategies.fedsa", SharingPolicy(shared=frozenset({"A"}), private=frozenset({"B", "head"}))),
    "ffa": ("fedlora.strategies.ffa", SharingPolicy(shared=frozenset({"B", "head"}), frozen=frozenset({"A"}))),
    "hetlora": ("fedlora.strategies.hetlora", SharingPolicy(shared=_ALL, heterogeneous_ranks=True)),
    "flora": (
        "fedlora.strategies.flora",
        SharingPolicy(shared=_ALL, merge_global_into_base=True, heterogeneous_ranks=True),
    ),
    "flexlora": ("fedlora.strategies.flexlora", SharingPolicy(shared=_ALL, heterogeneous_ranks=True)),
}

_CLASSES = {
    "LoraStrategy": "fedlora.strategies.base",
    "Update": "fedlora.strategies.base",
    "RejectedReply": "fedlora.validation",
    "FedIT": "fedlora.strategies.fedit",
    "FedSALoRA": "fedlora.strategies.fedsa",
    "FFALoRA": "fedlora.strategies.ffa",
    "HetLoRA": "fedlora.strategies.hetlora",
    "FLoRA": "fedlora.strategies.flora",
    "FlexLoRA": "fedlora.strategies.flexlora",
}

__all__ = ["BUILTIN", *_CLASSES]


def __getattr__(name: str) -> object:
    """The strategy classes by name (``from fedlora.strategies import FedIT``), loaded on first use."""
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module 'fedlora.strategies' has no attribute {name!r}")

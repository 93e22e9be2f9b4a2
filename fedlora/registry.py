"""Strategy registry: one explicit registration per strategy file, duplicates refused.

Kept free of heavy imports: ``strategy_names()`` and ``policy_for()`` import the strategy
package only when first asked, and the strategy package imports Flower, not torch models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlora.sharing import SharingPolicy

_REGISTRY: dict[str, type] = {}


def register_strategy(name: str):  # noqa: ANN201 - class decorator
    """Class decorator: ``@register_strategy("fedsa")``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered ({_REGISTRY[name].__name__})")
        if not hasattr(cls, "sharing_policy"):
            raise TypeError(f"strategy {cls.__name__} must declare a class attribute `sharing_policy`")
        cls.strategy_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load() -> None:
    if not _REGISTRY:
        import fedlora.strategies  # noqa: F401 - registers the built-in strategies


def strategy_names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> type:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def policy_for(name: str) -> SharingPolicy:
    return get_strategy(name).sharing_policy

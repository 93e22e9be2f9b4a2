"""Registries the core asks instead of importing a concern: strategies (one explicit registration
per strategy file, duplicates refused), task types (what a model is trained to do: the columns it
reads, how rows become examples, its loss and its evaluation) and model extensions (a concern that
shapes the model the core builds, such as a continual method's frozen head and AM-LoRA's selector).

Kept free of heavy imports: ``strategy_names()`` and ``policy_for()`` read the strategy package's
table of built-ins (:data:`fedlora.strategies.BUILTIN`) and import no strategy module; the built-in
model extensions are imported by name the first time a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from fedlora.sharing import SharingPolicy

# The registries hold classes of the strategy and extension protocols (fedlora.strategies.base,
# fedlora.extensions); those modules import this one, so the types are not imported back here.
StrategyClass = Any  # a fedlora.strategies.base.LoraStrategy subclass
ExtensionClass = Any  # a fedlora.extensions.Extension subclass

_REGISTRY: dict[str, StrategyClass] = {}


def register_strategy(name: str):
    """Class decorator: ``@register_strategy("fedsa")``. A built-in strategy's sharing policy comes
    from :data:`fedlora.strategies.BUILTIN`; any other must declare ``sharing_policy`` on its class."""

    def deco(cls: Any) -> Any:  # a LoraStrategy subclass, given its name and policy here
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a strategy named {name!r} is already registered ({_REGISTRY[name].__name__})")
        builtin = _builtin().get(name)
        if builtin is not None:
            cls.sharing_policy = builtin[1]
        elif not hasattr(cls, "sharing_policy"):
            raise TypeError(f"strategy {cls.__name__} must declare a class attribute `sharing_policy`")
        cls.strategy_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _builtin() -> dict:
    # The strategy package's table (light: it imports neither Flower nor torch); a strategy module
    # itself is imported only when its class is asked for.
    from fedlora.strategies import BUILTIN

    return BUILTIN


def strategy_names() -> list[str]:
    return sorted(set(_builtin()) | set(_REGISTRY))


def get_strategy(name: str) -> StrategyClass:
    if name not in _REGISTRY and name in _builtin():
        import importlib

        importlib.import_module(_builtin()[name][0])  # registers itself
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(strategy_names())}") from None


def policy_for(name: str) -> SharingPolicy:
    """The sharing policy of strategy ``name``, without importing a built-in strategy's module."""
    if name in _REGISTRY:
        return _REGISTRY[name].sharing_policy
    if name in _builtin():
        return _builtin()[name][1]
    return get_strategy(name).sharing_policy


# --------------------------------------------------------------------------- model extensions
# A model extension is an object with:
#   applies(cfg) -> bool                          does it shape this run's model
#   cache_key(cfg, label_names) -> tuple          what of the run it depends on (the model cache's key)
#   prepare_base(cfg, base, label_names) -> bool  change the base model before PEFT wraps it; True when
#                                                 the classifier head is now part of the frozen base
#   after_peft(cfg, model) -> None                change the PEFT model after it is built
_MODEL_EXTENSIONS: list = []
_BUILTIN_EXTENSIONS = ("fedlora.continual.extension",)


def register_model_extension(extension):
    """Add a model extension (see the comment above); one per concern."""
    if any(type(e) is type(extension) for e in _MODEL_EXTENSIONS):
        raise ValueError(f"a model extension of type {type(extension).__name__} is already registered")
    _MODEL_EXTENSIONS.append(extension)
    return extension


def model_extensions(cfg) -> list:
    """The registered model extensions that apply to ``cfg``."""
    if not _MODEL_EXTENSIONS:
        import importlib

        for name in _BUILTIN_EXTENSIONS:
            importlib.import_module(name)  # registers itself
    return [e for e in _MODEL_EXTENSIONS if e.applies(cfg)]


# --------------------------------------------------------------------------- task types
# A task type (see fedlora/tasks/classification.py, the reference one) is an object with:
#   columns(dc, cfg) -> [(config key, column)]     the dataset columns it reads
#   free_rows(split, cfg) -> list[dict] | None       rows of a split when they carry no label (None: labelled)
#   prepare(cfg) -> None                             checks before any tokenizing
#   encode(tok, rows, cfg, label_names) -> dict      tokenized rows: {"ids", "labels", ...}
#   answers(cfg, label_names)                        what scoring generated answers needs (or None)
#   targets(examples, ids, mask, idx) -> Tensor      a batch's training targets
#   loss(outputs, targets) -> Tensor                 the training loss
#   evaluate(model, examples, batch_size, device) -> {"loss", "accuracy"?, "num-examples", ...}
_TASK_TYPES: dict[str, object] = {}
_BUILTIN_TASKS = {"classification": "fedlora.tasks.classification", "causal-lm": "fedlora.tasks.causal_lm"}


def register_task_type(name: str, task) -> object:
    """Add the task type ``model.task = name`` (duplicates refused)."""
    if name in _TASK_TYPES and _TASK_TYPES[name] is not task:
        raise ValueError(f"a task type named {name!r} is already registered")
    _TASK_TYPES[name] = task
    return task


def task_type(name: str):
    """The task type registered as ``name`` (a built-in one is imported the first time it is asked)."""
    if name not in _TASK_TYPES and name in _BUILTIN_TASKS:
        import importlib

        importlib.import_module(_BUILTIN_TASKS[name])  # registers itself
    try:
        return _TASK_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown task type {name!r}; known: {', '.join(task_type_names())}") from None


def task_type_names() -> list[str]:
    """Every task type ``model.task`` may name: the built-in ones and any registered since."""
    return list(_BUILTIN_TASKS) + sorted(set(_TASK_TYPES) - set(_BUILTIN_TASKS))


def task_of(examples) -> object:
    """The task type of tokenized examples: the one that encoded them (``Examples.task``); examples
    built without one are causal-LM examples when they carry prompt lengths, else classification."""
    return task_type(examples.task or ("causal-lm" if examples.causal else "classification"))


# --------------------------------------------------------------------------- extensions
# An extension is a fedlora.extensions.Extension subclass (see that module for its hooks). The
# built-in concerns register themselves from their own modules, imported when a run's extensions
# are first asked for; plug-in methods are the public modules of the package fedlora.methods (each a
# light declaration: its config section and its Extension, the torch part imported by its hooks)
# and any installed package's entry point in the group "fedlora.methods".
_EXTENSIONS: dict[str, ExtensionClass] = {}
_E = TypeVar("_E")  # the decorated class, returned as it is
_BUILTIN_CONCERNS = (
    "fedlora.sharing_parts",
    "fedlora.aggregation.bound",
    "fedlora.aggregation.trust",
    "fedlora.dylora",
    "fedlora.continual.extension",
    "fedlora.privacy.example_level",
    "fedlora.privacy.client_level",
)
_DISCOVERED: list[bool] = []


def register_extension(cls: _E) -> _E:
    """Class decorator: add an extension under ``cls.name`` (duplicates refused)."""
    ext: ExtensionClass = cls
    if not ext.name:
        raise TypeError(f"extension {ext.__name__} must declare a class attribute `name`")
    if ext.name in _EXTENSIONS and _EXTENSIONS[ext.name] is not ext:
        raise ValueError(f"an extension named {ext.name!r} is already registered ({_EXTENSIONS[ext.name].__name__})")
    if ext.section_name and any(e.section_name == ext.section_name and e is not ext for e in _EXTENSIONS.values()):
        raise ValueError(f"extension {ext.name!r}: config section [{ext.section_name}] is already owned")
    _EXTENSIONS[ext.name] = ext
    return cls


def _discover_plugins() -> None:
    """Import every plug-in method's declaration once (light modules: the config reads them)."""
    if _DISCOVERED:
        return
    _DISCOVERED.append(True)
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import fedlora.methods

    for info in pkgutil.iter_modules(fedlora.methods.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"fedlora.methods.{info.name}")  # registers itself
    for ep in entry_points(group="fedlora.methods"):
        ep.load()  # a third-party package's plug-in: registers itself on import


def plugin_sections() -> dict[str, type]:
    """Config sections owned by plug-in methods: ``{section name: its dataclass}``."""
    _discover_plugins()
    return {e.section_name: e.section for e in _EXTENSIONS.values() if e.section_name and e.section is not None}


def plugin_extensions() -> list[ExtensionClass]:
    """Every plug-in method's extension class (light: no hook has run)."""
    _discover_plugins()
    return sorted(_EXTENSIONS.values(), key=lambda e: (e.order, e.name))


def continual_method_names() -> list[str]:
    """The continual methods that plug-ins provide (``continual.method`` may name them)."""
    return sorted(e.continual_method for e in plugin_extensions() if e.continual_method)


def extensions_for(cfg: Any) -> list[Any]:  # a FedLoraConfig -> Extension instances
    """The extensions ``cfg`` uses, built for it, in hook order (``order``, then name)."""
    import importlib

    for module in _BUILTIN_CONCERNS:
        importlib.import_module(module)  # registers itself on first import (these import torch); then a lookup
    return [cls(cfg) for cls in plugin_extensions() if cls.applies(cfg)]

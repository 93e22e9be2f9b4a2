"""Registries the core asks instead of importing a concern: strategies (one explicit registration
per strategy file, duplicates refused), task types (what a model is trained to do: the columns it
reads, how rows become examples, its loss and its evaluation) and model extensions (a concern that
shapes the model the core builds, such as a continual method's frozen head and AM-LoRA's selector).

Kept free of heavy imports: ``strategy_names()`` and ``policy_for()`` import the strategy
package only when first asked, and the strategy package imports Flower, not torch models; the
built-in model extensions are imported by name the first time a model is built.
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
        # The strategies register themselves here as their modules load (the decorator above), so the
        # table imports them on first use, as a plugin table does; at the top it would be a cycle.
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


# --------------------------------------------------------------------------- model extensions
# A model extension is an object with:
#   applies(cfg) -> bool                          does it shape this run's model
#   cache_key(cfg, label_names) -> tuple          what of the run it depends on (the model cache's key)
#   prepare_base(cfg, base, label_names) -> bool  change the base model before PEFT wraps it; True when
#                                                 the classifier head is now part of the frozen base
#   after_peft(cfg, model) -> None                change the PEFT model after it is built
_MODEL_EXTENSIONS: list = []
_BUILTIN_EXTENSIONS = ("fedlora.continual.extension",)


def register_model_extension(extension):  # noqa: ANN001, ANN201 - returns its argument
    """Add a model extension (see the comment above); one per concern."""
    if any(type(e) is type(extension) for e in _MODEL_EXTENSIONS):
        raise ValueError(f"a model extension of type {type(extension).__name__} is already registered")
    _MODEL_EXTENSIONS.append(extension)
    return extension


def model_extensions(cfg) -> list:  # noqa: ANN001 - a FedLoraConfig
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


def register_task_type(name: str, task) -> object:  # noqa: ANN001
    """Add the task type ``model.task = name`` (duplicates refused)."""
    if name in _TASK_TYPES and _TASK_TYPES[name] is not task:
        raise ValueError(f"a task type named {name!r} is already registered")
    _TASK_TYPES[name] = task
    return task


def task_type(name: str):  # noqa: ANN201
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


def task_of(examples) -> object:  # noqa: ANN001 - fedlora.data.Examples
    """The task type of tokenized examples: the one that encoded them (``Examples.task``); examples
    built without one are causal-LM examples when they carry prompt lengths, else classification."""
    return task_type(examples.task or ("causal-lm" if examples.causal else "classification"))

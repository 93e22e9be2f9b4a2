"""The pieces every config section is made of: the error an operator reads, field help, the checks
a section's ``validate`` uses, and how TOML values are coerced to a field's type.

No fedlora imports: a concern's section (``fedlora/privacy/config.py``, ``fedlora/continual/config.py``,
``fedlora/deploy/config.py``) and the core sections (:mod:`fedlora.sections`) build on this, and
:mod:`fedlora.config` composes them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field, fields
from typing import Any, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """An operator's mistake in a run configuration; the message names the field."""


def _meta(help: str, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": help})
    return field(default=kw.pop("default"), metadata={"help": help})


def _require(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config value for '{key}': {why}")


def _require_template(template: str, key: str, *fields: str) -> None:
    """A ``str.format`` template may use only ``fields``: a typo fails on load, not mid-run."""
    try:
        template.format(**{f: "" for f in fields})
    except (KeyError, IndexError, ValueError) as exc:
        names = ", ".join("{" + f + "}" for f in fields)
        raise ConfigError(
            f"invalid config value for '{key}': {exc!r}; it may use {names} (write {{{{ and }}}} for literal braces)"
        ) from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"invalid config value for '{key}': expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"invalid config value for '{key}': expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config value for '{key}': expected an integer, got {value!r}") from None
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"invalid config value for '{key}': expected a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid config value for '{key}': expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"invalid config value for '{key}': expected a table, got {value!r}")
        hints = get_type_hints(hint)
        known = {f.name for f in fields(hint)}
        for k in value:
            if k not in known:
                raise ConfigError(f"unknown config key '{key}.{k}'; known keys: {', '.join(sorted(known))}")
        built: Any = hint  # a dataclass type (checked by fields() above)
        return built(**{k: _coerce(f"{key}.{k}", v, hints[k]) for k, v in value.items()})
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"invalid config value for '{key}': expected a list, got {value!r}")
        (item,) = get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"invalid config value for '{key}': expected a table, got {value!r}")
        _, vt = get_args(hint)
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    return value


def toml_value(value: Any) -> str:
    """One value in TOML syntax (inline tables for dicts)."""
    import tomli_w

    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)

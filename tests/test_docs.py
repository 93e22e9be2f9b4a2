"""What the docs and docstrings claim holds in the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docstrings_name_only_functions_that_exist():
    import importlib

    missing = []
    for mod_name in (
        "fedlora.model",
        "fedlora.state",
        "fedlora.lora_math",
        "fedlora.codec",
        "fedlora.factors",
        "fedlora.clients.session",
        "fedlora.strategies.base",
        "fedlora.data",
        "fedlora.extensions",
        "fedlora.registry",
        "fedlora.server.app",
        "fedlora.continual.extension",
        "fedlora.methods.fedprox",
        "fedlora.methods.ewc",
        "fedlora.methods.lwf",
    ):
        mod = importlib.import_module(mod_name)
        for ref in re.findall(r":(?:func|class):`~?([\w.]+)`", mod.__doc__ or ""):
            target = ref.rsplit(".", 1)
            owner = importlib.import_module(target[0]) if len(target) == 2 and target[0].startswith("fedlora") else mod
            if not hasattr(owner, target[-1]):
                missing.append(f"{mod_name}: {ref}")
    assert not missing, missing


def test_nothing_claims_optimizer_state_is_kept():
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "fedlora" / "state.py"):
        text = path.read_text()
        claims = [line for line in text.splitlines() if "optimizer state" in line.lower() and "not" not in line.lower()]
        assert not claims, (path, claims)

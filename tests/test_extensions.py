"""The extension protocol (fedlora/extensions.py): the hub files name no concern, and a method
defined outside fedlora shapes a real run through the hooks alone."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import make_config
from fedlora.extensions import ClientRound, Extension
from fedlora.schema import _meta

ROOT = Path(__file__).resolve().parents[1]
HUBS = [
    "clients/app.py",
    "clients/session.py",
    "strategies/base.py",
    "server/app.py",
    "server/global_model.py",
    "server/evaluation.py",
    "server/recorder.py",
]
CONCERNS = (
    "fedlora.continual",
    "fedlora.privacy",
    "fedlora.dylora",
    "fedlora.methods",
    "fedlora.sharing_parts",  # FedSA-LoRA's private parts, FLoRA's merged base, HetLoRA's pruning
    "fedlora.aggregation.bound",  # the robust layer
    "fedlora.aggregation.share_cap",
    "fedlora.robust",
)
# What a concern's config or policy is called: a hub that reads one decides for that concern.
CONCERN_NAMES = ("merge_global_into_base", ".private", "hetlora", "cfg.robust", "robust.", "privacy.", "continual.")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize("hub", HUBS)
def test_a_hub_file_imports_no_concern(hub):
    """The round protocol calls hooks; which privacy mechanism, continual method or plug-in is on is
    the registry's business (fedlora.registry.extensions_for), never an import of the hub."""
    named = {m for m in _imports(ROOT / hub) if m.startswith(CONCERNS)}
    assert not named, f"{hub} imports {sorted(named)}"


@pytest.mark.parametrize("hub", ["clients/session.py", "strategies/base.py", "server/app.py"])
def test_a_hub_file_reads_no_concerns_setting(hub):
    """The three hub files of issue 36 decide nothing for a concern: no code line of theirs (comments
    and docstrings aside) reads a concern's config section or sharing-policy flag."""
    tree = ast.parse((ROOT / hub).read_text())
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)
    }
    code = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, (ast.Attribute, ast.Constant)) and id(n) not in docs and not isinstance(n, ast.Constant)
    ]
    strings = [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]
    found = sorted({name for name in CONCERN_NAMES for text in code + strings if name in text})
    assert not found, f"{hub} reads {found}"


@dataclass
class StepCounterSection:
    every: int = _meta("Report after this many steps.", default=1)

    def validate(self) -> None:
        if self.every < 1:
            from fedlora.schema import ConfigError

            raise ConfigError("invalid config value for 'stepcounter.every': must be >= 1")


class StepCounter(Extension):
    """A method written outside fedlora: the server asks every client for a tag, each client counts
    its training steps with a hook of its own and replies with the count and the tag."""

    name = "test-step-counter"
    section_name = "stepcounter"
    section = StepCounterSection

    @classmethod
    def applies(cls, cfg) -> bool:
        return "stepcounter" in cfg.plugins

    def round_config(self, server_round: int) -> dict[str, int | float | str | bool]:
        return {"stepcounter-tag": 1000 + server_round}

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list]:
        from fedlora.training import TrainingHook

        counter = self

        class Count(TrainingHook):
            def loss(self, ctx, loss):
                counter.steps += 1
                return loss

        self.steps, self.tag = 0, int(client.config["stepcounter-tag"])
        yield [Count()]

    def reply_metrics(self, client: ClientRound) -> dict[str, float]:
        return {"counted-steps": float(getattr(self, "steps", -1)), "stepcounter-tag": float(getattr(self, "tag", -1))}


def test_a_method_defined_outside_fedlora_shapes_a_real_run_through_the_hooks(tmp_path):
    from fedlora import registry
    from fleet import run_recorded

    registry.register_extension(StepCounter)
    try:
        cfg = make_config(tmp_path, stepcounter={"every": 2}, train={"local_steps": 3})
        assert cfg.section("stepcounter").every == 2
        replies = run_recorded(cfg, engine="inprocess")[2].train_replies()
        assert replies and not any(m.has_error() for m in replies)
        for m in replies:
            metrics = m.content["metrics"]
            assert metrics["counted-steps"] == 3.0  # its hook ran every step of the one training loop
            assert metrics["stepcounter-tag"] in (1001.0, 1002.0)  # the server's round config reached it
    finally:
        registry._EXTENSIONS.pop(StepCounter.name, None)

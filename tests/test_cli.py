"""The command line as a user runs it (a subprocess per command)."""

from __future__ import annotations

import json
import subprocess
import sys

from fedlora.config import FedLoraConfig


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )


def test_config_reference_is_the_embedded_default_as_toml():
    import tomllib

    out = _cli("config", "--reference")
    assert out.returncode == 0, out.stderr
    from fedlora.registry import plugin_sections

    parsed = tomllib.loads(out.stdout)
    default = FedLoraConfig.load()
    core = {k: v for k, v in parsed.items() if k not in plugin_sections()}
    assert core == json.loads(json.dumps(default.to_dict()))
    assert set(parsed) - set(core) == set(plugin_sections())  # every plug-in's keys, at their defaults
    assert parsed["train"]["learning_rate"] == default.train.learning_rate
    assert parsed["federation"]["evaluate_every"] == default.federation.evaluate_every
    assert "True" not in out.stdout and "# Number of federated rounds." in out.stdout


def test_help_points_to_the_reference_and_documents_every_option():
    sim = _cli("simulate", "--help").stdout
    assert "fedlora config --reference" in " ".join(sim.split())
    conf = " ".join(_cli("config", "--help").stdout.split())
    assert "TOML run config to validate" in conf and "Override a key" in conf

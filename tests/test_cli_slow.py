"""The README's main command, end to end (slow: run by the benchmark job, not by CI's suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_simulate_learns(tmp_path):
    env = dict(os.environ, FEDLORA_CACHE=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-m", "fedlora.cli", "simulate", "--set", f'run.output_dir="{tmp_path}"'],
                   check=True, env=env, cwd=tmp_path, timeout=900)
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("fortunes-fedit")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["server-accuracy"] > 0.45  # 4 collections; the majority class is about a third
    assert (run / "adapter" / "adapter_model.safetensors").exists()

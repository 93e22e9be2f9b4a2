"""The README's main command, end to end (slow: run by the benchmark job, not by CI's suite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_simulate_reaches_075_in_about_two_minutes(tmp_path):
    env = dict(os.environ, FEDLORA_CACHE=str(tmp_path / "cache"))
    subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", "--set", f'run.output_dir="{tmp_path}"'],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("fortunes-fedit")]
    summary = json.loads((run / "summary.json").read_text())
    # 4 collections: chance 0.25, the majority class about a third; the tuned default reaches ~0.8
    assert summary["final"]["server-accuracy"] >= 0.75, summary["final"]
    assert summary["baselines"]["chance"] == 0.25
    assert (run / "adapter" / "adapter_model.safetensors").exists()

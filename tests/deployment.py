"""Helpers for the tests that run real federations on Flower's deployment runtime: `fedlora server`
and `fedlora client` as processes on 127.0.0.1, their logs and run directories, and the same run
on the in-process grid as the reference a deployment must reproduce."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import make_config


def cli(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    fh = open(log, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def kill_group(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)


def wait_for(pred, timeout: float, what: str, logs: list[Path] = ()):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    text = "\n".join(f"--- {p}\n" + (p.read_text(errors="replace")[-3000:] if p.exists() else "(none)") for p in logs)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{text}")


def run_dir_of(root: Path) -> Path | None:
    found = [p for p in (root / "runs").glob("*") if (p / "config.toml").exists()]
    return found[0] if found else None


def rows(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def server_config(tmp_path: Path, creds, port: int, rounds: int, enrolled: int = 3, **federation) -> Path:
    import tomli_w

    cfg = make_config(
        tmp_path,
        run={"rounds": rounds},
        federation={
            "num_clients": 3,
            "min_train_clients": 3,
            "min_evaluate_clients": 3,
            "round_timeout": 90.0,
            **federation,
        },
    )
    raw = cfg.to_dict()
    from fedlora.deploy.processes import free_port

    raw["server"] = {
        "address": f"127.0.0.1:{port}",
        "control_port": free_port(),
        "tls_certfile": str(creds.server_cert),
        "tls_keyfile": str(creds.server_key),
        "tls_ca_certfile": str(creds.ca_cert),
        "enrolled_keys": [str(n.public_key) for n in creds.nodes[:enrolled]],
    }
    path = tmp_path / "server.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def start_clients(
    tmp_path: Path, creds, port: int, which=range(3), ids: dict | None = None, flags: dict | None = None
) -> list[subprocess.Popen]:
    procs = []
    for i in which:
        procs.append(
            cli(
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(creds.ca_cert),
                "--node-key",
                str(creds.nodes[i].private_key),
                "--partition-id",
                str(i),
                "--client-id",
                (ids or {}).get(i, f"node-{i}"),
                "--state-dir",
                str(tmp_path / f"state{i}"),
                *(flags or {}).get(i, []),
                log=tmp_path / f"client{i}.log",
            )
        )
    return procs


OUTSIDER_APP = (
    '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
    '[project]\nname = "outsider"\nversion = "1.0.0"\ndependencies = []\n'
    '[tool.flwr.app]\npublisher = "outsider"\n'
    '[tool.flwr.app.components]\nserverapp = "x:app"\nclientapp = "x:app"\n'
)


def outsider_attempts(tmp_path: Path, creds, port: int) -> dict:
    """What someone with only ca.crt tries at the devices' address with Flower's unmodified CLI, the
    address plain and disguised: list runs and nodes, register a key, submit an app, stop a run.
    {(what, address name): (exit code, output)}."""
    home = tmp_path / "outsider-home"
    home.mkdir()
    app = tmp_path / "outsider-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(OUTSIDER_APP)
    (app / "x.py").write_text("app = None\n")
    # The devices' address as given, and disguised with dot segments that the unmodified CLI sends on.
    doors = {"door": "", "dots": "/v1/fleet/%2e%2e/%2e%2e", "raw-dots": "/v1/fleet/../..", "slash": "/v1/fleet/..%2f.."}
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "door"\n'
        + "".join(
            f'[superlink.{name}]\naddress = "127.0.0.1:{port}{path}"\nroot-certificates = "{creds.ca_cert}"\n'
            for name, path in doors.items()
        )
    )
    env = {**os.environ, "FLWR_HOME": str(home)}
    flwr = str(Path(sys.executable).parent / "flwr")
    attempts = {
        "list runs": ["ls"],
        "list nodes": ["supernode", "ls"],
        "register a key": ["supernode", "register", str(creds.nodes[3].public_key)],
        "submit an app": ["run", str(app)],
        "stop a run": ["stop", "1"],
    }

    def attempt(what: str, door: str) -> subprocess.Popen:
        return subprocess.Popen(
            [flwr, *attempts[what], door], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )

    procs = {(what, door): attempt(what, door) for what in attempts for door in doors}
    results = {key: (p.wait(120), p.stdout.read()) for key, p in procs.items()}
    # Twenty CLIs at once on a loaded machine: one whose connection timed out before the gate answered
    # (Flower's "unavailable", no answer at all) tries again, one at a time, as its user would.
    for key in list(results):
        for _ in range(3):
            said = " ".join(results[key][1].replace("│", " ").split())  # Flower's error panel, unwrapped
            if "Connection to the SuperLink is unavailable" not in said:
                break
            p = attempt(*key)
            results[key] = (p.wait(120), p.stdout.read())
    return results


def simulation_of(config: Path, tmp_path: Path):
    """The same run on the in-process grid (fedlora's ServerApp and ClientApp, one process): the
    reference a deployment must reproduce. tests/test_simulation.py holds that grid equal to
    Flower's simulation engine."""
    from fedlora.config import FedLoraConfig
    from fedlora.rundir import RunDir
    from fedlora.simulate import simulate

    cfg = FedLoraConfig.load(config)
    cfg.run.output_dir = str(tmp_path / "sim")
    return simulate(cfg, run_dir=RunDir(tmp_path / "sim" / "run"), engine="inprocess").path


def final_factors(run: Path) -> dict[str, torch.Tensor]:
    from fedlora.state import tensors_from_file

    return tensors_from_file(run / "checkpoint" / "global.safetensors")[0]


def assert_same_factors(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"

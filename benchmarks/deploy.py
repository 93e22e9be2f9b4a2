"""Deployment versus simulation for the same run: start-up, seconds per round, a client's memory.

One config (pretrained all-MiniLM-L6-v2 on AG News from ../shared/data, 3 clients, FedIT, 3 rounds)
runs three ways in one benchmark: Flower's simulation engine (`fedlora simulate`); a real
federation on 127.0.0.1 with TLS and node authentication (`fedlora server` + three `fedlora client`
processes with their resident executors, which keep the model loaded); and the same federation
with `fedlora client --cold` (Flower's default: a fresh ClientApp process, imports and model load
per message). Each client process sets one torch thread itself (`--threads 1`). Per-round seconds exclude round 1 (setup, first
loads). Writes
benchmarks/results/deploy.json and deploy.png.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, SHARED_DATA, write
from fedlora.deploy.processes import free_port

ROUNDS = 3


def config(root: Path, port: int, creds) -> Path:
    import tomli_w

    raw = {
        "run": {"name": "deploy-bench", "rounds": ROUNDS, "seed": 7, "output_dir": str(root / "runs")},
        "model": {"name": "builtin:all-MiniLM-L6-v2", "max_length": 48},
        "data": {
            "dataset": str(SHARED_DATA / "agnews"),
            "max_train_examples": 600,
            "max_test_examples": 300,
            "partitioner": "iid",
        },
        "federation": {"num_clients": 3, "min_train_clients": 3, "min_evaluate_clients": 3, "round_timeout": 300.0},
        # No thread count from the server: each device sizes its own (`fedlora client --threads 1`: three
        # client processes share this machine's cores); the simulation is given the same count.
        "train": {"batch_size": 16, "learning_rate": 5e-3, "local_epochs": 1},
        "server": {
            "address": f"127.0.0.1:{port}",
            "control_port": free_port(),
            "tls_certfile": str(creds.server_cert),
            "tls_keyfile": str(creds.server_key),
            "tls_ca_certfile": str(creds.ca_cert),
            "enrolled_keys": [str(n.public_key) for n in creds.nodes],
        },
    }
    path = root / "bench.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _per_round(rows: list[dict], key: str = "seconds") -> float:
    later = [r.get(key) or 0.0 for r in rows if r["round"] >= 2]
    return sum(later) / len(later)


def _breakdown(rows: list[dict]) -> dict:
    """Where a later round's seconds go: the clients' own training (mean over clients), the server's
    work (aggregation, evaluation, checkpoint) and the rest: transport, message hops, waiting on
    polls, task starts and the clients' evaluation."""
    train, server = _per_round(rows, "client-train-seconds"), _per_round(rows, "server-seconds")
    return {"client_train_s": train, "server_s": server, "rest_s": _per_round(rows) - train - server}


def simulation(cfg_path: Path, root: Path) -> dict:
    from fedlora.config import FedLoraConfig
    from fedlora.rundir import RunDir
    from fedlora.simulate import simulate

    cfg = FedLoraConfig.load(cfg_path)
    cfg.train.num_threads = 1  # what each deployed device chooses with --threads 1
    t0 = time.perf_counter()
    run = simulate(cfg, run_dir=RunDir(root / "sim")).path
    rows = _rows(run)
    return {
        "mode": "simulation",
        "total_s": time.perf_counter() - t0,
        "round1_s": rows[1]["seconds"],
        "per_round_s": _per_round(rows),
        **_breakdown(rows),
        "final_accuracy": rows[-1]["server-accuracy"],
        "initial_accuracy": rows[0]["server-accuracy"],
    }


def deployment(cfg_path: Path, port: int, root: Path, creds, cold: bool) -> dict:
    env = {**os.environ}
    tag = "cold" if cold else "resident"
    out = root / tag
    out.mkdir()
    t0 = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "server", "-c", str(cfg_path)],
        stdout=open(out / "server.log", "wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    clients = []
    for i in range(3):
        args = [
            sys.executable,
            "-m",
            "fedlora.cli",
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--root-certificates",
            str(creds.ca_cert),
            "--node-key",
            str(creds.nodes[i].private_key),
            "--partition-id",
            str(i),
            "--threads",
            "1",
            "--state-dir",
            str(out / f"state{i}"),
        ]
        clients.append(
            subprocess.Popen(
                args + (["--cold"] if cold else []),
                stdout=open(out / f"client{i}.log", "wb"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
    try:
        code = server.wait(1800)
    finally:
        for p in [server, *clients]:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in clients:
            p.wait(30)
    total = time.perf_counter() - t0
    log = (out / "server.log").read_text()
    if code != 0:
        raise RuntimeError(f"deployment ({tag}) failed:\n{log[-3000:]}")
    run = Path(re.search(r"run directory: (\S+)", log).group(1))
    rows = _rows(run)
    up = float(re.search(r"SuperLink up in ([\d.]+)s", log).group(1))
    peaks = []
    for i in range(3):
        text = (out / f"state{i}" / "executor.log").read_text() if not cold else ""
        found = [float(x) for x in re.findall(r"peak memory (\d+) MB", text)]
        if found:
            peaks.append(max(found))
    return {
        "mode": f"deployment ({tag})",
        "total_s": total,
        "superlink_start_s": up,
        "round1_s": rows[1]["seconds"],
        "per_round_s": _per_round(rows),
        **_breakdown(rows),
        "final_accuracy": rows[-1]["server-accuracy"],
        "initial_accuracy": rows[0]["server-accuracy"],
        "client_peak_rss_mb": max(peaks) if peaks else None,
        "run_dir": str(run),
    }


def run(quick: bool = False) -> dict:
    from fedlora.deploy.pki import create_credentials
    from fedlora.deploy.processes import free_port

    root = Path(tempfile.mkdtemp(prefix="fedlora-deploy-bench-"))
    creds = create_credentials(root / "creds", ["127.0.0.1"], nodes=3)
    rows = []
    cfg_path = config(root, free_port(), creds)  # the simulation ignores [server]
    print("[deploy] simulation", flush=True)
    rows.append(simulation(cfg_path, root))
    for cold in (False, True):
        print(f"[deploy] deployment {'cold' if cold else 'resident'}", flush=True)
        port = free_port()
        rows.append(deployment(config(root, port, creds), port, root, creds, cold))
    sim, res, cold_row = rows
    payload = {
        "rounds": ROUNDS,
        "clients": 3,
        "model": "all-MiniLM-L6-v2",
        "rows": rows,
        "per_round_deploy_over_sim": res["per_round_s"] / sim["per_round_s"],
        "per_round_cold_over_resident": cold_row["per_round_s"] / res["per_round_s"],
    }
    write("deploy", payload)
    _plot(rows)
    return payload


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["mode"] for r in rows]
    ax.bar(
        [i - 0.2 for i in range(len(rows))], [r["round1_s"] for r in rows], width=0.4, label="round 1 (setup, loads)"
    )
    ax.bar([i + 0.2 for i in range(len(rows))], [r["per_round_s"] for r in rows], width=0.4, label="later rounds, mean")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("seconds")
    ax.set_title("3 clients, MiniLM r=8, same config: simulation vs deployment")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(RESULTS / "deploy.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    from benchmarks.common import setup_env

    setup_env()
    print(json.dumps(run(), indent=1))

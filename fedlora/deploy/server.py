"""`fedlora server`: a SuperLink, node enrolment, and fedlora's ServerApp submitted to it.

The SuperLink keeps its state in SQLite (``<run dir>/superlink.db``) and Flower's CLI talks to it
through a connection written to ``<run dir>/flwr-home/config.toml``, so a run directory holds
everything a restart needs. The ServerApp writes a checkpoint after every round; ``--resume``
starts the SuperLink again on the same database and submits the same app with ``resume = true``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedlora import __version__
from fedlora.config import FedLoraConfig
from fedlora.deploy.control import CONNECTION, RunStatus, stop_orphaned_runs
from fedlora.deploy.prechecks import enrolled_keys, preflight, security
from fedlora.deploy.processes import flower_bin, spawn, stop, tail, wait_for_port
from fedlora.env import DEFAULTS
from fedlora.rundir import RunDir

MAX_RESTARTS = 3  # SuperLink restarts `fedlora server` attempts before it gives up

APP_PYPROJECT = """# Written by `fedlora server`: the Flower App it submits. The code is the installed fedlora
# package (the same version on server and clients), so the FAB carries no code and no data.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlora-app"
version = "{version}"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.server.app:app"
clientapp = "fedlora.clients.app:app"

[tool.flwr.app.config]
config = ""
run-dir = ""
resume = false
bind-node-names = false
"""


@dataclass
class Deployment:
    """What a running `fedlora server` started: addresses, processes, timings."""

    run_dir: RunDir
    address: str
    tls: bool
    superlink: subprocess.Popen | None = None
    gate: subprocess.Popen | None = None  # fedlora.deploy.fleet_gate, unless the Control API is exposed
    run_id: int | None = None
    log_follower: subprocess.Popen | None = None
    restarts: int = 0
    node_auth: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    gate_socket: socket.socket | None = None  # the devices' address, bound before the private network

    @property
    def home(self) -> Path:
        return self.run_dir.path / "flwr-home"

    def env(self) -> dict[str, str]:
        return {"FLWR_HOME": str(self.home)}

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:

        res = subprocess.run(
            [flower_bin("flwr"), *args],
            capture_output=True,
            text=True,
            env={**os.environ, **DEFAULTS, **self.env()},
            timeout=120,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({res.returncode}): {(res.stdout + res.stderr).strip()}")
        return res


def start_superlink(dep: Deployment, cfg: FedLoraConfig) -> None:
    """The SuperLink on 127.0.0.1 (its Control API for the operator only) and, unless the operator
    exposes it knowingly, fedlora's gate on server.address forwarding the devices' Fleet API to it."""
    s = cfg.server
    host, port = s.superlink_host_port()
    db = s.database or str(dep.run_dir.path / "superlink.db")
    args = [
        flower_bin("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        db,
        "--disable-runtime-dependency-installation",
    ]
    if dep.tls:
        args += [
            "--ssl-certfile",
            s.tls_certfile,
            "--ssl-keyfile",
            s.tls_keyfile,
            "--ssl-ca-certfile",
            s.tls_ca_certfile,
        ]
    else:
        args.append("--insecure")
    if dep.node_auth:
        args.append("--enable-supernode-auth")

    t0 = time.perf_counter()
    log_path = dep.run_dir.path / "superlink.log"
    dep.superlink = spawn(args, log_path, env={**DEFAULTS, **dep.env()})
    wait_for_port(host, port, dep.superlink, log_path)
    dep.timings["superlink-start-seconds"] = time.perf_counter() - t0


def start_gate(dep: Deployment, cfg: FedLoraConfig) -> None:
    """:mod:`fedlora.deploy.fleet_gate` on server.address, in front of the loopback SuperLink. Served
    after the nodes are enrolled (the socket is bound earlier; a device's connection waits in its
    backlog), so no device meets a SuperLink that does not know its key yet."""
    import sys

    s = cfg.server
    if s.expose_control_api or (dep.gate is not None and dep.gate.poll() is None):
        return
    up_host, up_port = s.superlink_host_port()
    fd = devices_socket(dep, cfg).fileno()
    args = [sys.executable, "-m", "fedlora.deploy.fleet_gate", "--fd", str(fd), "--upstream", f"{up_host}:{up_port}"]
    if dep.tls:
        args += ["--certfile", s.tls_certfile, "--keyfile", s.tls_keyfile, "--ca", s.tls_ca_certfile]
    log_path = dep.run_dir.path / "gate.log"
    dep.gate = spawn(args, log_path, pass_fds=(fd,))
    wait_for_gate(dep.gate, log_path)


def wait_for_gate(proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    """Until the gate says it serves (its socket accepts connections from the moment it is bound,
    so a port probe would say nothing); a clear error if it exits or stays silent."""
    from fedlora.deploy.fleet_gate import READY

    start = log_path.stat().st_size if log_path.exists() else 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the gate exited with code {proc.returncode}; last lines of {log_path}:\n{tail(log_path)}"
            )
        if log_path.exists() and READY.encode() in log_path.read_bytes()[start:]:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the gate did not start serving within {timeout:g} s; see {log_path}")


def devices_socket(dep: Deployment, cfg: FedLoraConfig) -> socket.socket:
    """The gate's listening socket on server.address, bound once (in the machine's network, before
    the private one) and handed to every gate process this server starts."""
    if dep.gate_socket is None:
        from fedlora.deploy.isolation import bind_listener

        try:
            dep.gate_socket = bind_listener(*cfg.server.host_port())
        except OSError as exc:
            raise RuntimeError(f"server.address {cfg.server.address}: cannot listen there: {exc.strerror}") from None
    return dep.gate_socket


def isolate(dep: Deployment, cfg: FedLoraConfig, say: Callable[[str], None]) -> None:
    """Bind the devices' address, then move this process into its private network (see
    :mod:`fedlora.deploy.isolation`), where everything it starts afterwards runs: the SuperLink's
    Control API is then out of reach of the machine's other accounts. Says so when it cannot."""
    from fedlora.deploy.isolation import PID_FILE, enter_private_network, fetch_hub_files

    s = cfg.server
    if s.expose_control_api:
        return
    devices_socket(dep, cfg)
    c_host, c_port = s.superlink_host_port()
    # What the ServerApp loads from the hub comes now: inside the private network nothing outside is reachable.
    fetched = fetch_hub_files(cfg) if s.private_network else []
    why = enter_private_network() if s.private_network else "server.private_network is off"
    if why is None:
        os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        (dep.run_dir.path / PID_FILE).write_text(f"{os.getpid()}\n")
        say(
            f"the SuperLink runs in a private network: its Control API ({c_host}:{c_port}) is reachable only from "
            f"this server's processes and `fedlora control {dep.run_dir.path} -- flwr ...`"
            + (f"; fetched before: {', '.join(fetched)}" if fetched else "")
        )
    else:
        say(
            f"WARNING: {why}. The SuperLink's Control API listens on {c_host}:{c_port}, where every account of "
            "this machine can list runs and node keys, register a node key and submit an app that runs as this "
            "user (Flower's open-source SuperLink has no account authentication); run the server on a machine "
            "with no other users, or where the kernel allows it (docs/deployment.md: The control port)"
        )


def write_connection(dep: Deployment, cfg: FedLoraConfig) -> None:
    import tomli_w

    host, port = cfg.server.superlink_host_port()  # the operator's side: the SuperLink itself
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    conn: dict = {"address": f"{local}:{port}"}
    if dep.tls:
        conn["root-certificates"] = cfg.server.tls_ca_certfile
    else:
        conn["insecure"] = True
    dep.home.mkdir(parents=True, exist_ok=True)
    (dep.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def enrol(dep: Deployment, keys: list[Path]) -> list[str]:
    """Register each node key; a key already registered (a restarted SuperLink on its database) is fine."""
    notes = []
    for key in keys:
        # Named after the key's file, as the ServerApp names the node (fedlora.deploy.control.EnrolledNodes
        # decides who takes part from the key files themselves, not from this registration).
        res = dep.flwr("supernode", "register", str(key), CONNECTION, "--name", key.stem, check=False)
        text = (res.stdout + res.stderr).strip()
        if res.returncode != 0 and "already" not in text.lower():
            raise RuntimeError(f"enrolling {key} failed: {text}")
        notes.append(f"{key.name}: {'enrolled' if res.returncode == 0 else 'already enrolled'}")
    return notes


def write_app(dep: Deployment) -> Path:

    app = dep.run_dir.path / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(version=__version__))
    return app


def open_to_devices(dep: Deployment, cfg: FedLoraConfig, say: Callable[[str], None] = print) -> None:
    """Stop every run that a dead ServerApp left unfinished, then serve the devices (the gate), in
    that order: no device can be pulling one of a run's messages when the run is stopped. Flower
    1.42's SuperNode keeps a message whose run stopped during its pull as a task; that task's reply
    then goes out in place of the next run's first reply, which waits for the node's next message
    (a round timeout). With ``server.expose_control_api`` there is no gate: the runs are stopped as
    soon as the SuperLink answers, and a device that connects first can still meet this."""
    for rid in stop_orphaned_runs(dep.home):
        say(f"run {rid} stopped: its ServerApp is gone (a server or SuperLink that stopped before it finished)")
    start_gate(dep, cfg)


def submit(dep: Deployment, app: Path, resume: bool) -> int:
    """Submit the run (:func:`open_to_devices` has stopped any other); return its id."""
    overrides = dep.run_dir.path / "app-run-config.toml"
    import tomli_w

    overrides.write_text(
        tomli_w.dumps(
            {
                "config": str(dep.run_dir.path / "config.toml"),
                "run-dir": str(dep.run_dir.path),
                "resume": resume,
                "bind-node-names": dep.node_auth,
            }
        )
    )
    res = dep.flwr("run", str(app), CONNECTION, "--run-config", str(overrides), "--format", "json")
    try:
        out = json.loads(res.stdout[res.stdout.index("{") :])
        return int(out["run-id"])
    except (ValueError, KeyError) as exc:
        raise RuntimeError(f"flwr run gave no run id: {res.stdout.strip()} {res.stderr.strip()}") from exc


# ServerApp log lines worth a console line: what it waits for, what it refuses, how it recovers.
NOTEWORTHY = (
    "waiting for clients",
    "clients connected after",
    "rejected",
    "left out",
    "no reply",
    "resuming",
    "aggregation failed",
    "skipped",
    "is not enrolled",
    "Traceback",
    "Error",
)


def follow_log(dep: Deployment) -> None:
    """Stream the ServerApp's log (Flower keeps it on the SuperLink) into <run dir>/serverapp.log."""

    stop(dep.log_follower)
    path = dep.run_dir.path / "serverapp.log"
    with open(path, "a") as fh:
        fh.write(f"--- run {dep.run_id}\n")
    dep.log_follower = spawn(
        [flower_bin("flwr"), "log", str(dep.run_id), CONNECTION, "--stream"],
        path,
        env={**DEFAULTS, **dep.env(), "COLUMNS": "400", "NO_COLOR": "1"},
    )


def restart_superlink(dep: Deployment, cfg: FedLoraConfig, app: Path, say: Callable[[str], None]) -> None:
    """The SuperLink died (and the ServerApp it ran with it): start it again on its SQLite database,
    where the nodes and their keys are kept, and continue the run from its last checkpoint."""
    dep.restarts += 1
    log_path = dep.run_dir.path / "superlink.log"
    if dep.restarts > MAX_RESTARTS:
        raise RuntimeError(f"the SuperLink exited {dep.restarts} times; see {log_path}:\n{tail(log_path)}")
    say(
        f"the SuperLink exited (code {dep.superlink.returncode}); restarting it on its database "
        f"({dep.restarts}/{MAX_RESTARTS})"
    )
    stop(dep.gate)  # devices wait in the socket's backlog until the dead run is stopped
    start_superlink(dep, cfg)
    open_to_devices(dep, cfg, say)
    if dep.run_dir.read_checkpoint() is not None:
        dep.run_id = submit(dep, app, resume=True)
        say(f"run {dep.run_id} resumes the run from its last completed round")
        follow_log(dep)
    else:  # nothing learned yet: start over, from a clean metrics file
        dep.run_dir.metrics_path.unlink(missing_ok=True)
        dep.run_id = submit(dep, app, resume=False)
        say(f"run {dep.run_id} starts the run again (no round had completed)")
        follow_log(dep)


def serve(
    cfg: FedLoraConfig,
    run_dir: RunDir,
    *,
    resume: bool = False,
    insecure: bool = False,
    on_round: Callable[[dict], None] | None = None,
    say: Callable[[str], None] = print,
) -> Deployment:
    """Run (or resume) one federation on a SuperLink this call starts and stops; returns when the
    run has finished. ``on_round`` sees each round's metrics row as the ServerApp writes it."""
    t_start = time.perf_counter()
    tls, node_auth = security(cfg, insecure)
    preflight(cfg, run_dir, resume)
    dep = Deployment(run_dir=run_dir, address=cfg.server.address, tls=tls, node_auth=node_auth)
    # The run directory holds the SuperLink's database, logs and the operator's connection: the
    # server's user alone reads it.
    run_dir.path.chmod(0o700)
    if not resume:
        run_dir.write_config(cfg)
    printed = {r["round"] for r in run_dir.read_metrics()}  # rounds already shown (a resumed run's earlier ones)

    def show_new_rounds() -> None:
        for row in run_dir.read_metrics():
            if row["round"] not in printed:
                printed.add(row["round"])
                if on_round is not None:
                    on_round(row)

    try:
        isolate(dep, cfg, say)
        start_superlink(dep, cfg)
        write_connection(dep, cfg)
        if node_auth:
            for note in enrol(dep, enrolled_keys(cfg)):
                say(f"  node key {note}")
        open_to_devices(dep, cfg, say)
        host, port = cfg.server.host_port()
        c_host, c_port = cfg.server.superlink_host_port()
        door = (
            "the SuperLink itself, Control API included (server.expose_control_api)"
            if cfg.server.expose_control_api
            else f"devices only (Fleet API); the Control API is on {c_host}:{c_port}, this machine only"
        )
        say(
            f"SuperLink serving {host}:{port} to {door} ({'TLS' if tls else 'no TLS'}, node authentication "
            f"{'on' if node_auth else 'off'}); clients join with: fedlora client --server <this host>:{port}"
            + (" --root-certificates <ca.crt> --node-key <node-N.key>" if tls else " --insecure")
        )
        app = write_app(dep)
        log_path = run_dir.path / "serverapp.log"
        # A resumed run's log holds the earlier server's lines (its last error included): echo only ours.
        log_seen = len(log_path.read_text(errors="replace").splitlines()) if log_path.exists() else 0
        dep.run_id = submit(dep, app, resume)
        follow_log(dep)
        dep.timings["start-seconds"] = time.perf_counter() - t_start
        say(
            f"run {dep.run_id} submitted ({'resuming' if resume else 'starting'} {run_dir.path}); waiting for "
            f"{cfg.federation.min_available_clients or cfg.federation.min_train_clients} clients"
        )
        run_status = RunStatus(dep)
        status, last_check = "", 0.0
        while True:
            show_new_rounds()
            if log_path.exists():
                lines = log_path.read_text(errors="replace").splitlines()
                for line in lines[log_seen:]:
                    # A boxed panel is `flwr log`'s own error (its connection to a dying SuperLink),
                    # not the ServerApp's: the restart has its own console line.
                    if any(k in line for k in NOTEWORTHY) and not line.lstrip().startswith(("╭", "│", "╰")):
                        say("  server: " + line.strip())
                log_seen = len(lines)
            if dep.superlink.poll() is not None:
                restart_superlink(dep, cfg, app, say)
            if time.monotonic() - last_check > 2.0:
                status, last_check = run_status(), time.monotonic()
                if status.startswith("finished"):
                    break
            time.sleep(0.5)
        run_status.close()
        show_new_rounds()
        if status != "finished:completed" or not (run_dir.path / "summary.json").exists():
            raise RuntimeError(
                f"run {dep.run_id} ended {status or 'without a status'}; the ServerApp's log is in "
                f"{run_dir.path / 'superlink.log'}:\n{tail(run_dir.path / 'superlink.log', 30)}"
            )
        dep.timings["total-seconds"] = time.perf_counter() - t_start
        return dep
    finally:
        stop(dep.log_follower)
        stop(dep.superlink)
        stop(dep.gate)
        if dep.gate_socket is not None:
            dep.gate_socket.close()
        (run_dir.path / "server.pid").unlink(missing_ok=True)

"""`fedlora client`: a device joins a federation with its own data.

It starts Flower's SuperNode (the node's connection to the SuperLink: TLS, node key, retries) and,
unless ``--cold``, fedlora's resident executor (:mod:`fedlora.deploy.executor`), which keeps the
run's base model loaded between rounds. Settings come from a small TOML file and/or flags::

    server = "203.0.113.7:9092"
    root_certificates = "ca.crt"
    node_key = "node-0.key"
    data = "my-data/"            # train.jsonl (+ test.jsonl), the run's text/label columns
    state_dir = "fedlora-state/" # private factors, DP accountant, this run's setup
    rank = 0                     # 0 = what the run's config gives this device class
    device_class = ""            # e.g. "edge", a class of the run's [hetero] table
    client_id = ""               # '' = the node key's file name
    threads = 0                  # torch threads on this device (0 = the run's train.num_threads)
    cache_dir = ""               # this device's model/data cache ('' = FEDLORA_CACHE or ~/.cache/fedlora)
    model_dirs = []              # folders a run may name as its base model (a hub id or builtin needs none)
    connect_wait = 60            # seconds unreachable before the console says so (it keeps trying)
    enrol_retry = 30             # seconds between tries while the server does not know this node's key
    executor = "auto"            # fork: tasks forked from the warm executor; worker: one process per run serves
                                 # them (no fork; auto picks it for a run on CUDA, which a fork cannot carry)

What the server's run config may not decide on a device: where its cache, state and personal
adapters are written, which local folder its base model is read from, and (for a device with its
own data) any data path: see :func:`fedlora.clients.session.device_view`.
"""

from __future__ import annotations

import os
import sys
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from fedlora.config import ConfigError
from fedlora.deploy.executor import STARTED as EXECUTOR_STARTED
from fedlora.deploy.processes import await_listener, flower_bin, free_port, spawn, stop, tail
from fedlora.deploy.supernode_log import CONNECTED, NODE_LOG, NOT_ENROLLED, UNREACHABLE
from fedlora.env import DEFAULTS


@dataclass
class ClientSettings:
    server: str = ""
    root_certificates: str = ""
    node_key: str = ""
    insecure: bool = False
    data: str = ""
    state_dir: str = "fedlora-state"
    rank: int = 0
    device_class: str = ""
    client_id: str = ""
    partition_id: int = -1  # a partition of the run's dataset instead of own data (trials)
    runtime_port: int = 0  # the SuperNode's local Runtime API port (0 = a free one)
    max_retries: int = -1  # connection attempts to the SuperLink (-1 = retry forever)
    threads: int = 0  # torch threads on this device (0 = the run's train.num_threads): the device's to size
    cache_dir: str = ""  # this device's model and data cache ('' = FEDLORA_CACHE or ~/.cache/fedlora)
    model_dirs: list[str] = field(default_factory=list)  # folders a run may name as its base model on this device
    connect_wait: float = 60.0  # seconds without reaching the server before the console says so (it keeps trying)
    enrol_retry: float = 30.0  # seconds between tries while the server does not know this node's key
    executor: str = "auto"  # fork | worker | auto (worker for a run on CUDA): how the resident executor runs tasks

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict) -> ClientSettings:
        raw: dict = {}
        if path is not None:
            try:
                raw = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"client settings {path}: {exc}") from None
        known = {f.name: f for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise ConfigError(f"unknown client setting {key!r}; known: {', '.join(known)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        out = cls(**raw)
        out.validate()
        return out

    def validate(self) -> None:
        host, _, port = self.server.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"server must be host:port, got {self.server!r}")
        if self.insecure and (self.root_certificates or self.node_key):
            raise ConfigError("insecure contradicts root_certificates/node_key (TLS and node authentication)")
        if not self.insecure and not self.root_certificates:
            raise ConfigError(
                "TLS is on by default: give root_certificates (the CA that signed the server's "
                "certificate), or insecure = true for a server started with --insecure"
            )
        for key in ("root_certificates", "node_key"):
            v = getattr(self, key)
            if v and not Path(v).expanduser().exists():
                raise ConfigError(f"{key}: {v} does not exist")
        if not self.data and self.partition_id < 0:
            raise ConfigError(
                "data: give the folder or file holding this device's data (or partition_id for a trial "
                "on the run's own dataset)"
            )
        if self.data:
            check_data_folder(Path(self.data).expanduser())
        if self.rank < 0:
            raise ConfigError("rank must be >= 0 (0 = the run's rank for this device)")
        if self.threads < 0:
            raise ConfigError("threads must be >= 0 (0 = the run's train.num_threads)")
        if not self.enrol_retry > 0:
            raise ConfigError("enrol_retry must be > 0 seconds")
        if self.executor not in ("auto", "fork", "worker"):
            raise ConfigError(f"executor must be auto, fork or worker, got {self.executor!r}")

    def node_config(self) -> str:
        """Flower's ``--node-config`` string (TOML values)."""

        def q(v: str) -> str:
            return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

        cid = self.client_id or (Path(self.node_key).stem if self.node_key else "")
        items = {"state-dir": q(str(Path(self.state_dir).expanduser().resolve()))}
        if self.data:
            items["data"] = q(str(Path(self.data).expanduser().resolve()))
        if self.partition_id >= 0:
            items["partition-id"] = str(self.partition_id)
        if cid:
            items["client-id"] = q(cid)
        if self.rank:
            items["rank"] = str(self.rank)
        if self.device_class:
            items["device-class"] = q(self.device_class)
        if self.threads:
            items["threads"] = str(self.threads)
        if self.cache_dir:
            items["cache-dir"] = q(str(Path(self.cache_dir).expanduser().resolve()))
        if self.model_dirs:
            items["model-dirs"] = q(os.pathsep.join(str(Path(d).expanduser().resolve()) for d in self.model_dirs))
        return " ".join(f"{k}={v}" for k, v in items.items())


DATA_FORMATS = ("jsonl", "json", "csv", "parquet")


def check_data_folder(path: Path) -> None:
    """A device's --data: a folder with a train file (a test file is optional: without one, a test
    split is carved out of the training rows, as in simulation), or one file; said on the device's
    own console before it connects, naming the flag."""
    if not path.exists():
        raise ConfigError(f"--data {path}: does not exist")
    if path.is_dir():
        names = {f.name for f in path.iterdir()}
        if not any(f"train.{ext}" in names for ext in DATA_FORMATS):
            raise ConfigError(
                f"--data {path}: no train.jsonl (or train.json/.csv/.parquet) in the folder; "
                f"it has {', '.join(sorted(names)) or 'nothing'}"
            )


def enrol_hint(node_key: str, state_dir: Path) -> str:
    """The public key file the operator must enrol: beside the private key, or derived from it into the
    state folder (`fedlora certs` keeps a device's private key apart from the .pub files it enrols)."""
    key = Path(node_key).expanduser()
    pub = key.with_suffix(".pub")
    if pub.exists():
        return str(pub)
    from cryptography.hazmat.primitives import serialization

    blob = key.read_bytes()
    load = serialization.load_ssh_private_key if b"OPENSSH PRIVATE KEY" in blob else serialization.load_pem_private_key
    private = load(blob, password=None)
    pub = Path(state_dir) / f"{key.stem}.pub"
    pub.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return str(pub)


class ConsoleNotes:
    """One sentence per cause on the device's console, from the SuperNode's log: connected, the server
    unreachable for more than ``connect_wait`` seconds (with the time that really passed), rejoined
    (after how long), not enrolled."""

    def __init__(self, s: ClientSettings, say) -> None:
        self.s, self.say = s, say
        self.state = Path(s.state_dir).expanduser().resolve()
        self.said: set[str] = set()
        self.connected = False  # the current SuperNode's last word was a success
        self.ever = False  # this device has joined the server since it started
        self.lost_since: float | None = time.monotonic()  # when the server stopped answering (or the start)
        self.seen = 0  # how much of the current SuperNode's log is read
        self.failing = False  # its last connection attempt failed

    def once(self, cause: str, text: str) -> None:
        if cause not in self.said:
            self.said.add(cause)
            self.say(text)

    @property
    def _joined(self) -> Path:
        return self.state / "joined"  # this node once joined the server it names: a refusal now is a stale session

    def restarted(self) -> None:
        """The SuperNode was started again: its log starts anew, and the device is not connected."""
        self.seen, self.connected = 0, False
        if self.lost_since is None:
            self.lost_since = time.monotonic()

    def read(self, log_text: str) -> None:
        """Take the current SuperNode's log (all of it; only what is new is read)."""
        new, self.seen = log_text[self.seen :], len(log_text)
        ok, bad = max(new.rfind(m) for m in CONNECTED), new.rfind(UNREACHABLE)
        now = time.monotonic()
        if ok > bad and not self.connected:
            away = now - self.lost_since if self.lost_since is not None else 0.0
            if self.ever:
                self.say(f"rejoined the server at {self.s.server} after {away:.0f} s")
            else:
                self.say(f"connected to the server at {self.s.server}")
            self.connected = self.ever = True
            self.failing = False
            self.lost_since = None
            self.said.discard("unreachable")
            self._joined.write_text(self.s.server)
        elif bad > ok:
            self.connected, self.failing = False, True
            if self.lost_since is None:
                self.lost_since = now
        if self.failing and self.lost_since is not None and now - self.lost_since > self.s.connect_wait:
            self.once(
                "unreachable",
                f"cannot reach the server at {self.s.server} for {now - self.lost_since:.0f} s: "
                "check the address and port, and that `fedlora server` runs there (still trying)",
            )

    def exited(self, log_text: str) -> float | None:
        """Seconds to wait before starting the SuperNode again when its exit has a known cause (said once),
        else None. Flower refuses activation both to a key it does not know and to a node it still counts
        online: a node restarted within two heartbeats of its previous session (Flower 1.42: 2 x 30 s)."""
        if NOT_ENROLLED not in log_text:
            return None
        joined = self._joined.read_text() if self._joined.exists() else ""
        if joined == self.s.server:
            self.once(
                "still-online",
                "the server still counts this node's previous session as online (Flower keeps "
                "a node online for two heartbeats, up to 60 s, after it stops): rejoining "
                "when that lapses, trying every 5 s",
            )
            return 5.0
        self.once(
            "not-enrolled",
            "the server does not know this node's key: ask the operator to enrol "
            f"{enrol_hint(self.s.node_key, self.state)} (trying again every {self.s.enrol_retry:g} s)",
        )
        return self.s.enrol_retry


def run_client(s: ClientSettings, cold: bool = False, say=print) -> int:
    """Run until interrupted (or until the SuperNode gives up); returns the SuperNode's exit code."""

    state = Path(s.state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    port = s.runtime_port or free_port()
    args = [
        flower_bin("flower-supernode"),
        "--superlink",
        s.server,
        "--node-config",
        s.node_config(),
        "--port",
        str(port),
    ]
    args += ["--insecure"] if s.insecure else ["--root-certificates", str(Path(s.root_certificates).expanduser())]
    if s.node_key:
        args += ["--auth-supernode-private-key", str(Path(s.node_key).expanduser())]
    if s.max_retries >= 0:
        args += ["--max-retries", str(s.max_retries)]
    if not cold:
        args += ["--isolation", "process"]
    env = {**DEFAULTS}
    node_log = state / NODE_LOG
    node = executor = None
    say(
        f"fedlora client: SuperNode -> {s.server} ({'no TLS' if s.insecure else 'TLS'}"
        f"{', node key ' + Path(s.node_key).name if s.node_key else ''}); data {s.data or 'partition ' + str(s.partition_id)};"
        f" state {state}; logs {node_log}" + ("" if cold else f", {state / 'executor.log'}")
    )
    notes = ConsoleNotes(s, say)
    start_at = 0  # where the current start's lines begin in the SuperNode's log: they carry its cause

    def node_text() -> str:
        return node_log.read_bytes()[start_at:].decode(errors="replace") if node_log.exists() else ""

    try:
        shown, starts = 0, 0
        while True:
            if node is None:
                starts += 1
                if not cold and executor is None:  # first: its imports (seconds) overlap the wait for the server
                    executor = spawn(
                        [sys.executable, "-m", "fedlora.deploy.executor", f"127.0.0.1:{port}", str(state), s.executor],
                        state / "executor.log",
                        env=env,
                    )
                if starts == 1:
                    # A device started before its server joins as soon as the server listens, not at the
                    # SuperNode's next back-off try; after connect_wait the SuperNode starts anyway and
                    # keeps trying on its own (the console then says the server is unreachable).
                    await_listener(s.server, s.connect_wait)
                start_at = node_log.stat().st_size if node_log.exists() else 0
                node = spawn(args, node_log, env=env)
            if executor is not None:  # the executor's own lines (model loaded, peak memory, bad data) to the console
                lines = (state / "executor.log").read_text(errors="replace").splitlines()
                for line in lines[shown:]:
                    if " fedlora.client " in line and "task " not in line and EXECUTOR_STARTED not in line:
                        say(line.split(" fedlora.client ", 1)[1].strip())
                shown = len(lines)
            notes.read(node_text())
            if node.poll() is not None or (executor is not None and executor.poll() is not None):
                failed = "SuperNode" if node.poll() is not None else "resident executor"
                wait = notes.exited(node_text()) if failed == "SuperNode" else None
                known = wait is not None
                why = tail(node_log if failed == "SuperNode" else state / "executor.log", 6)
                if s.max_retries >= 0 and starts > s.max_retries:
                    say(
                        f"the {failed} exited and max_retries ({s.max_retries}) is spent"
                        + ("" if known else f":\n{why}")
                    )
                    return 1
                # A SuperNode whose key is not enrolled yet, or whose server is down, exits: start it
                # again, as Flower's own retries would (the node's state folder survives). The
                # executor, still up, keeps its imports and model and waits for the new SuperNode's
                # Runtime API on the same port.
                if not known:
                    say(f"the {failed} exited; starting it again in 5 s. Last lines:\n{why}")
                stop(node)
                node = None
                if failed != "SuperNode" or executor is None or executor.poll() is not None:
                    stop(executor)
                    executor = None
                notes.restarted()
                time.sleep(wait if known else 5.0)
                continue
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        stop(executor)
        stop(node)

"""Start, watch and stop Flower's daemons (SuperLink, SuperNode) as child processes.

Each daemon runs under :mod:`fedlora.deploy.reaper`, a child subreaper in a session of its own:
when the process that started it dies (even by SIGKILL: the parent-death signal, Linux) or stops
it, the reaper ends the daemon *and every process the daemon started*, detached ones included
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``), so a crashed `fedlora server` or
`fedlora client` leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlora.deploy.reaper import GRACE, PASS_FDS


def flower_bin(name: str) -> str:
    """A Flower console script from this interpreter's environment (then PATH)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (it ships with flwr)")
    return found


def spawn(args: list[str], log_path: Path, env: dict | None = None, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """``args`` under the reaper, output appended to ``log_path``; ``pass_fds`` are inherited by the
    daemon itself (the reaper hands them on: :data:`fedlora.deploy.reaper.PASS_FDS`)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(log_path, "ab")
    env = {**os.environ, **(env or {})}
    if pass_fds:
        env[PASS_FDS] = ",".join(str(fd) for fd in pass_fds)
    # Flower's daemons start their helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by name.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.deploy.reaper", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        pass_fds=pass_fds,
    )


def daemon_name(proc: subprocess.Popen) -> str:
    """The daemon's name (``flower-superlink``), not the reaper's interpreter."""
    args = list(proc.args)
    if args[1:3] == ["-m", "fedlora.deploy.reaper"] and len(args) > 3:
        args = args[3:]
    return args[2] if args[1:2] == ["-m"] and len(args) > 2 else Path(args[0]).name  # python -m MODULE: MODULE


def accepts_connection(host: str, port: int, timeout: float) -> bool:
    """One try: does ``host:port`` accept a TCP connection within ``timeout`` seconds?"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> float:
    """Seconds until ``host:port`` accepts connections; a clear error if the process died first."""
    t0 = time.monotonic()
    probe = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{daemon_name(proc)} exited with code {proc.returncode} before serving "
                f"{host}:{port}; last lines of {log_path}:\n{tail(log_path)}"
            )
        if accepts_connection(probe, port, timeout=0.5):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"{daemon_name(proc)} did not serve {host}:{port} within {timeout:g} s; see {log_path}")


def await_listener(address: str, timeout: float, every: float = 0.25) -> bool:
    """True as soon as ``host:port`` accepts a TCP connection, False after ``timeout`` seconds.
    Flower's SuperNode and Runtime clients back off exponentially (with jitter, up to tens of seconds
    between tries) from a refused connection: a process started before its peer is listening joins
    up to that much later than it could. Asking the port first, cheaply, joins within ``every``."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    t0 = time.monotonic()
    while not accepts_connection(host, int(port), timeout=1.0):
        if time.monotonic() - t0 >= timeout:
            return False
        time.sleep(every)
    return True


def stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGTERM the reaper (it ends the daemon's whole tree, then itself), then SIGKILL the process
    group of whatever is left after ``grace`` seconds more than the reaper's own grace."""
    if proc is None or proc.poll() is not None:
        return

    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(grace + GRACE)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def peak_memory_mb(maxrss: int | None = None) -> float:
    """This process's peak resident memory in MB, or that of a ``ru_maxrss`` figure (a child's, from
    ``os.wait4``): kilobytes on Linux, bytes on macOS."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if maxrss is None else maxrss
    return rss / 1024 if sys.platform.startswith("linux") else rss / 1024 / 1024


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

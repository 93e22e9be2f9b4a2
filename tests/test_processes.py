"""Crash hygiene of the daemons fedlora starts: a daemon and every helper it starts end with the
process that started them, even when that process is killed with SIGKILL (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

# A "daemon" that starts a helper of its own, detached in a new session as flower-superlink starts
# flower-superexec (out of any process group a supervisor could signal), then waits.
DAEMON = (
    "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
    "start_new_session=True); time.sleep(600)"
)


def _tree_of(pid: int, want: int, timeout: float = 20.0) -> list[psutil.Process]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        tree = psutil.Process(pid).children(recursive=True)
        if len(tree) >= want:
            return tree
        time.sleep(0.1)
    raise AssertionError(f"the process tree of {pid} did not grow to {want}")


def test_a_sigkilled_parent_takes_the_daemon_and_its_detached_helpers_with_it(tmp_path):
    parent_code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fedlora.deploy.processes import spawn
        spawn([sys.executable, "-c", {DAEMON!r}], Path({str(tmp_path / "daemon.log")!r}))
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        tree = _tree_of(parent.pid, 3)  # reaper, daemon, helper
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        _, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


def test_stop_ends_the_daemon_and_its_helpers(tmp_path):
    from fedlora.deploy.processes import daemon_name, spawn, stop

    proc = spawn([sys.executable, "-c", DAEMON], tmp_path / "daemon.log")
    tree = _tree_of(proc.pid, 2)
    assert daemon_name(proc) == os.path.basename(sys.executable)
    t0 = time.monotonic()
    stop(proc)
    _, alive = psutil.wait_procs(tree, timeout=15)
    assert not alive and time.monotonic() - t0 < 15


def test_a_peer_is_joined_as_soon_as_it_listens_and_a_silent_one_is_given_up_after_the_wait():
    """fedlora client starts its SuperNode once the server's port accepts a connection (Flower's own
    back-off would try again only seconds later); a port nobody serves gives up after the wait."""
    import socket
    import threading

    from fedlora.deploy.processes import await_listener, free_port

    port = free_port()
    t0 = time.monotonic()
    assert not await_listener(f"127.0.0.1:{port}", 0.5)
    assert 0.5 <= time.monotonic() - t0 < 10  # it waited, then gave up

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later() -> None:
        time.sleep(1.0)
        server.bind(("127.0.0.1", port))
        server.listen()

    threading.Thread(target=listen_later, daemon=True).start()
    try:
        t0 = time.monotonic()
        assert await_listener(f"[127.0.0.1]:{port}", 30.0, every=0.1)  # brackets, as an IPv6 address is written
        assert time.monotonic() - t0 < 15  # soon after the listen, not at the 30 s bound
    finally:
        server.close()

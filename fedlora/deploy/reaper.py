"""``python -m fedlora.deploy.reaper CMD ...``: run CMD, and end CMD's whole process tree with us.

Flower's daemons start helpers of their own (the SuperLink starts ``flower-superexec``, which
starts ``flwr-serverapp``; the SuperNode starts ``flwr-clientapp`` processes). A parent-death
signal on the daemon ends the daemon alone: after ``kill -9`` of ``fedlora server`` its helpers
were reparented to PID 1 and kept running for minutes (one of them the ServerApp holding the run,
about 800 MB). This reaper sits between fedlora and the daemon: it is the leader of a new process
group that the daemon and its helpers inherit, it receives SIGTERM when its own parent dies (the
parent-death signal, Linux), and on SIGTERM, SIGINT or the daemon's exit it signals the whole
group (SIGTERM, then SIGKILL after a grace period). ``fedlora.deploy.processes.stop`` signals the
group the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE = 8.0


def _end_group(first: int = signal.SIGTERM) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group includes us: finish the job first
    try:
        os.killpg(0, first)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE
    pgid = os.getpgid(0)
    while time.monotonic() < deadline and _others_alive(pgid):
        time.sleep(0.2)
    try:
        os.killpg(0, signal.SIGKILL)  # ends us too: nothing of the tree outlives this line
    except ProcessLookupError:
        pass


def _others_alive(pgid: int) -> bool:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a dependency
        return False
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        try:
            if p.pid != me and os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return False


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m fedlora.deploy.reaper CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getpgid(0) != os.getpid():
        os.setpgid(0, 0)
    stopping = {"now": False}

    def on_signal(signum, frame):  # noqa: ANN001, ANN202, ARG001
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The daemon inherits our process group, as do its own children; it also dies if we are SIGKILLed.
    child = subprocess.Popen(argv, preexec_fn=_die_with_parent)
    code = None
    while code is None and not stopping["now"]:
        if os.getppid() != parent:  # the parent died before the death signal was armed
            break
        try:
            code = child.wait(0.5)
        except subprocess.TimeoutExpired:
            pass
    _end_group()
    return code if code is not None else 143


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

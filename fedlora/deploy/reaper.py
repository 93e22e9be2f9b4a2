"""``python -m fedlora.deploy.reaper CMD ...``: run CMD, and end CMD's whole process tree with us.

Flower's daemons start helpers of their own: the SuperLink starts ``flower-superexec`` *detached*
(a new session), which starts ``flwr-serverapp``; the SuperNode starts ``flwr-clientapp``
processes. A parent-death signal on the daemon ends the daemon alone, and a process group misses
the detached helpers: after ``kill -9`` of ``fedlora server`` they were reparented to PID 1 and
kept running for minutes (one of them the ServerApp holding the run, about 800 MB).

This reaper sits between fedlora and the daemon. It is a *child subreaper* (Linux
``PR_SET_CHILD_SUBREAPER``): every descendant whose parent dies is reparented to it, not to PID 1,
so the whole tree stays its own, detached sessions included. It receives SIGTERM when its own
parent dies (the parent-death signal), and on SIGTERM, SIGINT or the daemon's exit it ends every
descendant (SIGTERM, then SIGKILL after a grace period) and then itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE = 8.0
PASS_FDS = "FEDLORA_PASS_FDS"  # comma-separated descriptors the reaper hands on to the daemon
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(option, value)


def end_tree(grace: float = GRACE) -> None:
    """SIGTERM every descendant of this process, SIGKILL what is left after ``grace`` seconds, and
    reap them all (as the subreaper, orphaned descendants are our children)."""
    import psutil

    me = psutil.Process()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        procs = me.children(recursive=True)
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and me.children(recursive=True):
            _reap()
            time.sleep(0.1)
        _reap()


def _reap() -> list[tuple[int, int]]:
    """Collect every exited child (orphans reparented to us included): [(pid, exit code)]."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return out
        if pid == 0:
            return out
        out.append((pid, os.waitstatus_to_exitcode(status)))


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent exits."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m fedlora.deploy.reaper CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    stopping = {"now": False}

    def on_signal(signum, frame):
        stopping["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The daemon also dies if the reaper itself is SIGKILLed.
    keep = tuple(int(fd) for fd in os.environ.pop(PASS_FDS, "").split(",") if fd)
    child = subprocess.Popen(argv, preexec_fn=die_with_parent, pass_fds=keep)
    code = None
    while code is None and not stopping["now"] and os.getppid() == parent:
        for pid, status in _reap():
            if pid == child.pid:
                code = status
                child.returncode = status  # reaped here, not by Popen.wait
        if code is None:
            time.sleep(0.5)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    end_tree()
    return code if code is not None else 143


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

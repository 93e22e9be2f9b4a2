"""The SuperLink's private network: no other account on the server machine can reach it.

Flower's open-source SuperLink serves its Control API (list runs, register node keys, submit an app
whose code runs as the server's user) with no account authentication, on the same HTTP port as
everything else. A loopback address keeps it off the network, not away from the machine's other
local accounts. So `fedlora server` gives the SuperLink a loopback of its own: before it starts
anything it binds the devices' listening socket (the gate's) in the machine's network, then moves
itself into a new Linux network namespace (:func:`enter_private_network`) whose only interface is a
fresh loopback. Every process it starts from then on (the SuperLink, its ServerApp and helpers, the
gate, its own Control API calls) shares that loopback; no process outside can connect to it, and
entering the namespace needs ``CAP_SYS_ADMIN`` over it (root, or the server's own user for a
namespace its own user namespace owns). The gate keeps the socket bound outside, so devices still
reach the Fleet API; nothing else of the SuperLink is reachable from outside the namespace.

As root the namespace is a plain network namespace; as another user it is owned by a new user
namespace that maps the user to itself (files keep their owner), where the kernel allows
unprivileged user namespaces. Where it cannot be made, :func:`enter_private_network` says why and
`fedlora server` says so at start: the SuperLink then listens on the machine's loopback, reachable
by every local account.

The operator reaches the SuperLink from a shell with :func:`run_inside` (``fedlora server
--control RUN_DIR -- flwr ls fedlora``), which joins the namespace of the server that runs there.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys
from pathlib import Path

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
PID_FILE = "server.pid"  # in the run directory: the process whose namespace --control joins


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def enter_private_network() -> str | None:
    """Move this process into a new network namespace with only a loopback, brought up. Every
    process started afterwards inherits it; sockets opened before keep the network they were opened
    in. Returns None on success, else a sentence saying why it could not (nothing changed then)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux's; this system has none"
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if _libc().unshare(flags) != 0:
        err = ctypes.get_errno()
        why = {
            errno.EPERM: "not permitted for this user (unprivileged user namespaces are off on this kernel, "
            "or a security module forbids them)",
            errno.EINVAL: "this process already runs threads (a user namespace needs a single-threaded caller)",
            errno.ENOSPC: "the user namespace limit is reached (user.max_user_namespaces)",
            errno.EUSERS: "the user namespace limit is reached (user.max_user_namespaces)",
        }
        return f"a private network namespace could not be made: {why.get(err, os.strerror(err))}"
    if uid != 0:  # map this user to itself, so files it writes keep their owner
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    loopback_up()
    return None


def fetch_hub_files(cfg) -> list[str]:
    """Download what the ServerApp will load from the Hugging Face hub (a hub model id, a hub dataset)
    into the caches it reads, before the private network cuts the server off; returns what it fetched."""
    from fedlora.model_sources import MINILM, TINY_BERT, TINY_DECODERS, cache_root

    out = []
    name = cfg.model.name
    if name not in (MINILM, TINY_BERT, *TINY_DECODERS) and not Path(name).expanduser().exists():
        from huggingface_hub import snapshot_download

        snapshot_download(name)
        out.append(f"model {name}")
    ds = cfg.data.dataset
    if ds and not ds.startswith("builtin:") and not Path(ds).expanduser().exists() and not cfg.data.data_files:
        from fedlora.data import _load_hf

        _load_hf(cfg.data, cache_root(cfg.model.cache_dir))
        out.append(f"dataset {ds}")
    return out


def loopback_up() -> None:
    """Bring this network namespace's ``lo`` up (a new namespace starts with it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` that a child process can inherit (the gate's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host or "0.0.0.0", port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_inside(run_dir: Path, argv: list[str], env: dict[str, str]) -> int:
    """Run ``argv`` in the private network of the `fedlora server` whose run directory is ``run_dir``
    (its pid is in ``run_dir/server.pid``); returns the command's exit code."""
    import subprocess

    try:
        pid = int((run_dir / PID_FILE).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        raise RuntimeError(
            f"no fedlora server is running for {run_dir} (no live process in {run_dir / PID_FILE})"
        ) from None

    def join() -> None:
        libc = _libc()
        ns = Path(f"/proc/{pid}/ns")
        if os.stat(ns / "user").st_ino != os.stat("/proc/self/ns/user").st_ino:
            with open(ns / "user") as fh:
                if libc.setns(fh.fileno(), CLONE_NEWUSER) != 0:
                    raise OSError(ctypes.get_errno(), "joining the server's user namespace")
        with open(ns / "net") as fh:
            if libc.setns(fh.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "joining the server's network namespace")

    return subprocess.run(argv, env={**os.environ, **env}, preexec_fn=join).returncode

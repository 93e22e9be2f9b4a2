"""The operator's side of a deployment: Flower's Control API on the SuperLink's private loopback,
asked in-process (no `flwr` process per question): the run's status, and which nodes hold an
enrolled key (:class:`EnrolledNodes`, :class:`EnrolledGrid`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

log = logging.getLogger("fedlora.server")  # the ServerApp's log, which `fedlora server` echoes

CONNECTION = "fedlora"  # the connection `fedlora server` writes to <run dir>/flwr-home/config.toml


def control_client(home: Path):
    """Flower's Control API client for the connection `fedlora server` wrote under ``home``."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection

    saved = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        # Flower's CLI helper prints "Using SuperLink: ..." for a person at `flwr`; the operator
        # of `fedlora server` did not type a flwr command.
        with contextlib.redirect_stdout(io.StringIO()):
            return init_http_client_from_connection(read_superlink_connection(CONNECTION))
    finally:
        if saved is None:
            os.environ.pop("FLWR_HOME", None)
        else:
            os.environ["FLWR_HOME"] = saved


def key_fingerprint(spki_der: bytes) -> str:
    """``SHA256:...`` of a public key, as ``ssh-keygen -lf KEY.pub`` prints it for the enrolled file."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_public_key(spki_der)
    blob = base64.b64decode(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _spki(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class EnrolledNodes:
    """Which of the SuperLink's nodes may take part, decided by fedlora: those whose public key is one
    of ``keys`` (the OpenSSH files of ``server.enrolled_keys``, read once, at construction). A node
    is known by its key from the SuperLink's node table (Control API on the private loopback), asked
    again whenever a node id appears that was not seen before. An enrolled node's name, its client
    id in the run, is its key file's name (``node-3.pub`` is ``node-3``); any other node is refused,
    and logged once with its key's fingerprint, whoever registered it and however."""

    binding = "its key is enrolled as"

    def __init__(self, home: Path, keys: list[Path]) -> None:
        from cryptography.hazmat.primitives import serialization

        self.home = home
        self.enrolled = {_spki(serialization.load_ssh_public_key(k.read_bytes())): k.stem for k in keys}
        self.names: dict[int, str] = {}
        self.refused: dict[int, str] = {}  # node id -> its key's fingerprint

    def _refresh(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

        client = control_client(self.home)
        try:
            nodes = client.ListNodes(ListNodesRequest()).nodes_info
        finally:
            client.close()
        for n in nodes:
            node_id = int(n.node_id)
            if node_id in self.names or node_id in self.refused:
                continue
            try:
                der = _spki(serialization.load_pem_public_key(n.public_key))
            except ValueError:
                der = b""
            if der in self.enrolled:
                self.names[node_id] = self.enrolled[der]
            else:
                self.refused[node_id] = key_fingerprint(der) if der else "(no readable key)"
                log.warning(
                    "node %d refused: its key %s is not enrolled (server.enrolled_keys); the SuperLink "
                    "registered it%s, and nothing it sends is used",
                    node_id,
                    self.refused[node_id],
                    f" as {n.name!r}" if n.name else "",
                )

    def allows(self, node_id: int) -> bool:
        if node_id not in self.names and node_id not in self.refused:
            self._refresh()
        return node_id in self.names

    def __call__(self, node_id: int) -> str | None:
        """The enrolled name of ``node_id`` (its client id), or None for a node that is not enrolled."""
        return self.names.get(node_id) if self.allows(node_id) else None


class EnrolledGrid:
    """A Flower ``Grid`` that shows the strategy only enrolled nodes (:class:`EnrolledNodes`): they
    alone are sampled, sent messages and heard; a reply from any other node is dropped."""

    def __init__(self, grid, nodes: EnrolledNodes) -> None:
        self._grid, self.nodes = grid, nodes

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if self.nodes.allows(n)]

    def push_messages(self, messages):
        messages = list(messages)
        allowed = [self.nodes.allows(m.metadata.dst_node_id) for m in messages]
        ids = iter(self._grid.push_messages([m for m, ok in zip(messages, allowed) if ok]))
        # a message to a node that is not enrolled is not pushed: it has no id, as Flower's own
        # grid answers for a message it could not push
        return [next(ids) if ok else "" for ok in allowed]

    def heard(self, reply) -> bool:
        """A reply from an enrolled node, or the SuperLink's error answer for one."""
        return self.nodes.allows(reply.metadata.src_node_id) or reply.has_error()

    def pull_messages(self, message_ids):
        return [r for r in self._grid.pull_messages(message_ids) if self.heard(r)]

    def split_pull(self):
        """The wrapped grid's :class:`~fedlora.aggregation.split_pull.SplitPull`, hearing what
        :meth:`pull_messages` hears."""
        from fedlora.aggregation.split_pull import split_pull_of

        split = split_pull_of(self._grid)
        if split is not None:
            split.keep = self.heard
        return split


class RunStatus:
    """The run's status ("running", "finished:completed", ...) from Flower's Control API, asked in
    this process over one HTTP client (as `flwr ls` asks it, without starting a `flwr` process each
    time: that cost about 2.3 CPU-seconds every 2 s, half a core for the whole run). "" while the
    SuperLink cannot answer (it is restarting); the client is then made anew."""

    def __init__(self, dep) -> None:
        self.dep = dep
        self._client = None

    def __call__(self) -> str:
        from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=no-name-in-module

        try:
            if self._client is None:
                self._client = self._connect()
            res = self._client.ListRuns(ListRunsRequest(run_id=self.dep.run_id))
            run = res.run_dict.get(self.dep.run_id)
            if run is None:
                return ""
            return run.status.status + (f":{run.status.sub_status}" if run.status.sub_status else "")
        except Exception:
            self.close()
            return ""

    def _connect(self):
        return control_client(self.dep.home)  # the connection this deployment wrote

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None


def stop_orphaned_runs(home: Path) -> list[int]:
    """Stop every run the SuperLink still lists as unfinished, and return their ids. `fedlora server`
    runs one run at a time on its own SuperLink, so before it submits one, an unfinished run belongs
    to a ServerApp that died with the previous SuperLink or server. Flower 1.42 keeps such a run
    "running" until its ServerApp's heartbeat lapses (about 45 s), and meanwhile keeps handing its
    undelivered messages to nodes: a node that takes one waits on its content for all that time and
    pulls nothing else. Stopping a run deletes its undelivered messages; the caller stops runs before
    devices can pull (see :func:`fedlora.deploy.server.open_to_devices`)."""
    from flwr.proto.control_pb2 import ListRunsRequest, StopRunRequest  # pylint: disable=no-name-in-module

    client = control_client(home)
    try:
        runs = client.ListRuns(ListRunsRequest()).run_dict
        orphans = sorted(int(rid) for rid, run in runs.items() if run.status.status != "finished")
        for rid in orphans:
            client.StopRun(StopRunRequest(run_id=rid))
        return orphans
    finally:
        client.close()

"""The operator's side of a deployment: Flower's Control API on the SuperLink's loopback port, asked
in-process (no `flwr` process per question): the run's status, and the names node keys were
enrolled under."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

CONNECTION = "fedlora"  # the connection `fedlora server` writes to <run dir>/flwr-home/config.toml


def control_client(home: Path):  # noqa: ANN201 - flwr's ControlHttpClient
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


class EnrolledNames:
    """node id -> the name its public key was registered under (`fedlora server` registers each key
    with its file name), from the SuperLink's node table over the operator's loopback Control API.
    Asked again only for a node id it has not seen."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.names: dict[int, str] = {}

    def __call__(self, node_id: int) -> str | None:
        if node_id not in self.names:
            from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module

            client = control_client(self.home)
            try:
                res = client.ListNodes(ListNodesRequest())
            finally:
                client.close()
            self.names.update({int(n.node_id): n.name for n in res.nodes_info if n.name})
        return self.names.get(node_id)


class RunStatus:
    """The run's status ("running", "finished:completed", ...) from Flower's Control API, asked in
    this process over one HTTP client (as `flwr ls` asks it, without starting a `flwr` process each
    time: that cost about 2.3 CPU-seconds every 2 s, half a core for the whole run). "" while the
    SuperLink cannot answer (it is restarting); the client is then made anew."""

    def __init__(self, dep) -> None:  # noqa: ANN001 - a fedlora.deploy.server.Deployment (its run_id, home)
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
        except Exception:  # noqa: BLE001 - the SuperLink may be restarting; the caller asks again
            self.close()
            return ""

    def _connect(self):  # noqa: ANN202 - flwr's ControlHttpClient
        return control_client(self.dep.home)  # the connection this deployment wrote

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a broken client
                pass
            self._client = None


def stop_orphaned_runs(home: Path) -> list[int]:
    """Stop every run the SuperLink still lists as unfinished, and return their ids. `fedlora server`
    runs one run at a time on its own SuperLink, so before it submits one, an unfinished run belongs
    to a ServerApp that died with the previous SuperLink or server. Flower 1.42 keeps such a run
    "running" until its ServerApp's heartbeat lapses (about 45 s), and meanwhile keeps handing its
    undelivered messages to nodes: a node that takes one waits on its content for all that time and
    pulls nothing else. Stopped, the run's messages are refused at once."""
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

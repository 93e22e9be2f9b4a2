"""The operator's side of a deployment: Flower's Control API on the SuperLink's loopback port, asked
in-process (no `flwr` process per question): the run's status, and the names node keys were
enrolled under."""

from __future__ import annotations

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

"""A federation in one process: fedlora's real ServerApp and ClientApp, real Flower Messages, no engine.

:class:`InProcessGrid` is a Flower ``Grid`` (``flwr.serverapp.Grid``). The server's code talks to it
as it talks to the simulation's and the deployment's grids. A pushed message is handed at once to
the ClientApp of its destination node, in this process, with that node's own ``Context``: the
``partition-id``/``num-partitions`` node config the simulation engine sets, and a state that
persists across the node's messages, as a SuperNode keeps it. The reply waits until it is pulled.

Messages cross by value: each one is copied on the way in and the way out, as a transport would
serialise it, so neither side can see the other's objects. A ClientApp that raises is answered for
with an error reply carrying the exception's sentence, as Flower's runtime does for a task that
fails.

This is for fast, deterministic runs of the maths, shapes, state and validation on the code that
runs in every mode (``fedlora.simulate.simulate(..., engine="inprocess")``). It leaves out
concurrency, separate processes, Ray, transport, timeouts and dropped nodes: those are tested on
the real simulation engine and the real deployment.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

FIRST_NODE_ID = 1001  # node ids of an in-process federation: FIRST_NODE_ID + partition id


def node_partitions(num_nodes: int) -> dict[int, int]:
    """Node id -> partition id of an in-process federation of ``num_nodes``."""
    return {FIRST_NODE_ID + i: i for i in range(num_nodes)}


class InProcessGrid(Grid):
    """``num_nodes`` nodes, node ``FIRST_NODE_ID + i`` holding partition ``i``, each running
    ``client_app`` (a ``flwr.clientapp.ClientApp``) on the messages sent to it."""

    def __init__(self, client_app, num_nodes: int, run_id: int = 1) -> None:
        from flwr.supercore.run import Run

        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for node, i in node_partitions(num_nodes).items()
        }
        self.replies: dict[str, Message] = {}
        self.pull_interval = 0.0  # every reply exists once its message is pushed

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.contexts:
                continue  # no such node: not pushed, no id (as Flower's grids answer)
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            self.replies[msg.metadata.message_id] = copy.deepcopy(self._deliver(copy.deepcopy(msg)))
            ids.append(msg.metadata.message_id)
        return ids

    def _deliver(self, msg: Message) -> Message:
        from flwr.common.constant import ErrorCode

        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"<class '{type(exc).__name__}'>:<'{exc}'>"),
                reply_to=msg,
            )

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(server_app, client_app, num_nodes: int, run_id: int = 1) -> InProcessGrid:
    """Run ``server_app`` (a ``flwr.serverapp.ServerApp``) against ``num_nodes`` in-process nodes
    running ``client_app``; returns the grid (its nodes' contexts hold their final state)."""
    from flwr.supercore.task_identity import TaskIdentity

    grid = InProcessGrid(client_app, num_nodes, run_id)
    # Flower sets a process's run identity before the ServerApp builds Messages; so does this.
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    try:
        server_app(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
    return grid

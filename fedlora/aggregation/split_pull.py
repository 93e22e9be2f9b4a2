"""Flower's deployment grid's pull in its two steps, so that one reply whose upload never completes
holds back no other reply that the same pull took.

``HttpGrid.pull_messages`` (the ServerApp's grid in a deployment, flwr 1.41-1.42) asks the SuperLink
for the replies to some ids (one call; the SuperLink marks each reply it returns as delivered and
answers "not found" if it is asked again), then downloads each reply's objects in turn, and returns
them all at the end. A node killed while it uploads leaves objects that never complete: Flower waits
on them for minutes, and every reply that call took waits with it. :class:`SplitPull` makes the same
calls, with the same error reply for objects that stay unavailable, but returns after the first one:
each reply it took comes with its own ``fetch()``, which :class:`~fedlora.aggregation.streaming.StreamingGrid`
runs in a thread of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

from flwr.app import Message

log = logging.getLogger("fedlora.server")

# (id of the message a reply answers, its download: the reply, or None for one the grid does not hear)
Taken = list[tuple[str, Callable[[], Message | None]]]


def split_pull_of(grid) -> SplitPull | None:
    """The grid's own ``split_pull()`` (a wrapper that filters replies gives its filter), a
    :class:`SplitPull` for Flower's ``HttpGrid``, or None for any other grid (the simulation's
    replies are in memory: nothing to download)."""
    if callable(getattr(type(grid), "split_pull", None)):
        return grid.split_pull()
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # a Flower without it: its own pull
        return None
    return SplitPull(grid) if isinstance(grid, HttpGrid) else None


class SplitPull:
    """``keep(reply)``: whether a downloaded reply is handed over (all, unless a wrapper says)."""

    def __init__(self, grid, keep: Callable[[Message], bool] | None = None) -> None:
        self.grid = grid
        self.keep = keep

    def take(self, message_ids: Iterable[str]) -> Taken:
        """The SuperLink's replies to ``message_ids`` that have come, each taken (delivered) now and
        downloaded by its ``fetch()``. A pull too large for the SuperLink's limit takes none, as
        Flower's own pull returns none then (logged)."""
        import httpx
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest  # pylint: disable=no-name-in-module

        try:
            res = self.grid._runtime_client.PullMessages(PullAppMessagesRequest(message_ids=list(message_ids)))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                log.error("a pull of replies was too large for the SuperLink: %s", exc)
                return []
            raise
        run_id = self.grid.run.run_id
        return [
            (proto.metadata.reply_to_message_id, partial(self._fetch, proto, tree, run_id))
            for proto, tree in zip(res.messages_list, res.message_object_trees, strict=True)
        ]

    def _fetch(self, proto, tree, run_id: int) -> Message | None:
        reply = self._download(proto, tree, run_id)
        return reply if self.keep is None or self.keep(reply) else None

    def _download(self, proto, tree, run_id: int) -> Message:
        """The reply's objects downloaded, its receipt confirmed, the reply inflated; Flower's own
        "Message Unavailable" error reply if an object stays unavailable after Flower's retries."""
        from flwr.app import Metadata
        from flwr.app.error import Error
        from flwr.app.message import make_message
        from flwr.common.constant import ErrorCode
        from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
        from flwr.supercore.date import now
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
        from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
        from flwr.supercore.inflatable.inflatable_utils import (
            ObjectPullError,
            inflate_object_from_contents,
            pull_objects,
        )

        client, node = self.grid._runtime_client, self.grid.node
        msg_id = proto.metadata.message_id
        try:
            contents = pull_objects(
                object_ids=[t.object_id for t in iterate_object_tree(tree)],
                pull_object_fn=make_pull_object_fn_protobuf(
                    pull_object_protobuf=client.PullObject, node=node, run_id=run_id
                ),
            )
        except ObjectPullError as exc:
            metadata = Metadata(
                run_id=run_id,
                message_id="",
                src_node_id=node.node_id,
                dst_node_id=node.node_id,
                message_type=SYSTEM_MESSAGE_TYPE,
                group_id="",
                ttl=0,
                reply_to_message_id=proto.metadata.reply_to_message_id,
                created_at=now().timestamp(),
            )
            reason = (
                "Reply message objects are unavailable. The sender may not have completed the upload "
                f"before the object-push session expired. {exc}"
            )
            return make_message(metadata=metadata, error=Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=reason))
        client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(node=node, run_id=run_id, message_object_id=msg_id))
        message = inflate_object_from_contents(msg_id, contents)
        message.metadata.__dict__["_message_id"] = msg_id  # the deflated message does not carry its own id
        return message

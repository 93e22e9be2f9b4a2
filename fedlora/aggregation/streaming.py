"""Replies handed over as they arrive, so the strategy folds each one and drops it.

Flower's ``Grid.send_and_receive`` pushes a round's messages, pulls replies until all have come
or the timeout passes, and returns them as one list: a round of 1,000 clients with a 7B adapter
holds 1,000 adapters at once. :class:`StreamingGrid` wraps any ``Grid`` (the simulation's, the
deployment's) and does the same push and pull, with the same timeout and pull interval, but
returns a generator: each batch of replies pulled is yielded one message at a time, and nothing
here keeps a reference to a reply once it is yielded. Flower's ``Strategy.start`` hands the
iterable straight to ``aggregate_train`` / ``aggregate_evaluate``, which consume it in order.

A node that stops sending heartbeats mid-round is answered for by Flower's SuperLink (an error from
the SuperLink's own node id); that error is handed over as the node's (:func:`in_place_of`), so the
round names the node once, by its client id.

Everything else (node ids, pushes, pulls, run info) is the wrapped grid's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message


class StreamingGrid:
    """A ``Grid`` whose ``send_and_receive`` yields replies as they are pulled, at most ``max_pull``
    per pull: Flower's grids return every reply that has arrived for the ids asked, so the ids are
    asked ``max_pull`` at a time, in turn, and replies that arrive faster than the consumer folds
    them wait at the SuperLink. Peak memory is then ``max_pull`` replies, not the backlog."""

    def __init__(self, grid, max_pull: int = 1_000_000) -> None:
        if max_pull < 1:
            raise ValueError(f"max_pull must be >= 1, got {max_pull}")
        self._grid = grid
        self.max_pull = max_pull

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        # Pushed now, as Flower's own call does (the round's clock starts at the push); pulled lazily.
        messages = list(messages)
        ids = [i for i in self._grid.push_messages(messages) if i]  # a message that was not pushed has none
        by_id = {m.metadata.message_id: m for m in messages}  # Flower's grids set it as they push
        sent: dict[str, Message | None] = {i: by_id.get(i) for i in ids}
        end = time.time() + (timeout if timeout is not None else 0.0)
        return self._pull(sent, end, timeout is None)

    def _pull(self, sent: dict[str, Message | None], end: float, forever: bool) -> Iterator[Message]:
        interval = float(getattr(self._grid, "pull_interval", 0.1))
        while sent and (forever or time.time() < end):
            got_any = False
            ids = list(sent)
            for start in range(0, len(ids), self.max_pull):  # one sweep over the waiting ids
                replies = list(self._grid.pull_messages(ids[start : start + self.max_pull]))
                got_any = got_any or bool(replies)
                for i, r in enumerate(replies):
                    replies[i] = in_place_of(r, sent.pop(r.metadata.reply_to_message_id, None))
                while replies:
                    yield replies.pop(0)  # popped: the consumer's reference is the last one
            if sent and not got_any:
                time.sleep(interval)


def in_place_of(reply: Message, original: Message | None) -> Message:
    """``reply`` as from the node ``original`` was sent to. When a node stops sending heartbeats,
    Flower's SuperLink answers its messages itself (an error, from the SuperLink's own node id): the
    error is passed on as the node's, so the node is named once, for what ended the wait."""
    if original is None or not reply.has_error() or reply.metadata.src_node_id == original.metadata.dst_node_id:
        return reply
    return Message(reply.error, reply_to=original)


def replies_per_pull(cfg, template) -> int:
    """How many replies fit ``federation.pull_budget_mb``: a reply at most carries every factor of
    the template (its largest rank) in the wire dtype; at least one."""
    per_value = 4 if cfg.federation.wire_dtype == "float32" else 2
    reply_mb = max(template.numel(), 1) * per_value / 2**20
    return max(1, int(cfg.federation.pull_budget_mb // reply_mb))

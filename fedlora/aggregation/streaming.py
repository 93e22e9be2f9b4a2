"""Replies handed over as they arrive, so the strategy folds each one and drops it.

Flower's ``Grid.send_and_receive`` pushes a round's messages, pulls replies until all have come
or the timeout passes, and returns them as one list: a round of 1,000 clients with a 7B adapter
holds 1,000 adapters at once. :class:`StreamingGrid` wraps any ``Grid`` (the simulation's, the
deployment's) and does the same push and pull, with the same timeout and pull interval, but
returns a generator: each batch of replies pulled is yielded one message at a time, and nothing
here keeps a reference to a reply once it is yielded. Flower's ``Strategy.start`` hands the
iterable straight to ``aggregate_train`` / ``aggregate_evaluate``, which consume it in order.

Everything else (node ids, pushes, pulls, run info) is the wrapped grid's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message


class StreamingGrid:
    """A ``Grid`` whose ``send_and_receive`` yields replies as they are pulled."""

    def __init__(self, grid) -> None:  # noqa: ANN001 - any flwr Grid
        self._grid = grid

    def __getattr__(self, name: str):  # noqa: ANN204 - delegate everything else
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        # Pushed now, as Flower's own call does (the round's clock starts at the push); pulled lazily.
        msg_ids = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        return self._pull(msg_ids, end, timeout is None)

    def _pull(self, msg_ids: set[str], end: float, forever: bool) -> Iterator[Message]:
        interval = float(getattr(self._grid, "pull_interval", 0.1))
        while msg_ids and (forever or time.time() < end):
            replies = list(self._grid.pull_messages(msg_ids))
            msg_ids.difference_update(r.metadata.reply_to_message_id for r in replies)
            while replies:
                yield replies.pop(0)  # popped: the consumer's reference is the last one
            if msg_ids:
                time.sleep(interval)

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

Flower's SuperLink hands a reply over once: ``pull_messages`` marks every reply it finds for the
ids asked as delivered, then downloads each one's objects in turn, and asking for that id again
answers "Message Unavailable" (not found). A pull can be slow for an honest reason (objects still
uploading: Flower retries with a backoff of 1, 2, 4 s) or stuck (a node killed while it uploads
leaves objects that never complete: Flower waits on them until the SuperLink gives them up, minutes).
Each pull therefore runs in its own thread and its replies are always handed over when it returns;
one not back within ``stall_seconds`` has its ids asked again in new pulls, so replies that arrive
after it was taken are handed over as they come. An error answer for an id that a pull still
running also asked (the "not found" of a reply that pull holds) waits for that pull, so a slow
pull's replies are never replaced by it. What this cannot do: replies taken by the same pull as a stuck upload wait
with it, and are named as missing if the round's timeout passes first.

Everything else (node ids, pushes, pulls, run info) is the wrapped grid's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message


class StreamingGrid:
    """A ``Grid`` whose ``send_and_receive`` yields replies as they are pulled, at most ``max_pull``
    per pull: Flower's grids return every reply that has arrived for the ids asked, so the ids are
    asked ``max_pull`` at a time, in turn, and replies that arrive faster than the consumer folds
    them wait at the SuperLink. Peak memory is then ``max_pull`` replies, not the backlog (plus
    those a stalled pull holds while its ids are asked again). Each reply is yielded once."""

    def __init__(self, grid, max_pull: int = 1_000_000, stall_seconds: float = 5.0) -> None:
        if max_pull < 1:
            raise ValueError(f"max_pull must be >= 1, got {max_pull}")
        self._grid = grid
        self.max_pull = max_pull
        self.stall_seconds = stall_seconds

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
        running: list[_Pull] = []  # in the order they started
        held: dict[str, Message] = {}  # an error answer for an id a running pull also asked

        def asked(i: str) -> bool:
            return any(i in p.ids for p in running)

        def finished() -> Iterator[Message]:
            for pull in [p for p in running if p.done()]:
                running.remove(pull)
                yield from _handed_over(pull.result(), sent, held, asked)
                # ids no pull asks any more: the error held for them is their answer
                for i in pull.ids:
                    if i in held and i in sent and not asked(i):
                        yield in_place_of(held.pop(i), sent.pop(i))

        while sent and (forever or time.time() < end):
            before = len(sent)
            yield from finished()
            # Awaited: an id a pull of its own asks, or one a pull asks that has not stalled. The others
            # (not answered, not held) are asked again: a stalled pull holds only what it took.
            now = time.monotonic()
            awaited = {i for p in running if len(p.ids) == 1 or now - p.started <= self.stall_seconds for i in p.ids}
            waiting = [i for i in sent if i not in held and i not in awaited]
            for start in range(0, len(waiting), self.max_pull):  # one sweep over the waiting ids
                pull = _Pull(self._grid, waiting[start : start + self.max_pull])
                running.append(pull)
                pull.wait(self.stall_seconds)
                yield from finished()
            if sent and len(sent) == before:
                time.sleep(interval)
        # Past the timeout: what the running pulls bring within one more stall period is taken (a
        # reply that was there when the round ended); a stuck one is left, and named as no reply.
        grace_end = time.time() + self.stall_seconds
        for pull in list(running):
            pull.wait(max(grace_end - time.time(), 0.0))
        yield from finished()


class _Pull:
    """``grid.pull_messages(ids)`` in a daemon thread: a pull stuck on a reply that will never
    complete is left behind (it ends when Flower gives the reply up) instead of holding the round."""

    def __init__(self, grid, ids: list[str]) -> None:
        self.ids = frozenset(ids)
        self.started = time.monotonic()
        self._replies: list[Message] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(grid, ids), daemon=True, name="fedlora-pull")
        self._thread.start()

    def _run(self, grid, ids: list[str]) -> None:
        try:
            self._replies = list(grid.pull_messages(ids))
        except BaseException as exc:  # raised where the round reads the result
            self._error = exc

    def wait(self, seconds: float) -> None:
        self._thread.join(seconds)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> list[Message]:
        if self._error is not None:
            raise self._error
        replies, self._replies = self._replies, []
        return replies


def _handed_over(
    replies: list[Message], sent: dict[str, Message | None], held: dict[str, Message], asked
) -> Iterator[Message]:
    """Each reply to a message still awaited, as from the node it was sent to (:func:`in_place_of`);
    one already handed over is dropped, and an error for an id that a running pull also asked
    (``asked(id)``) is kept in ``held`` until that pull returns."""
    while replies:
        reply = replies.pop(0)  # popped: the consumer's reference is the last one
        i = reply.metadata.reply_to_message_id
        if i not in sent:
            continue
        if reply.has_error() and asked(i):
            held[i] = reply
            continue
        held.pop(i, None)
        yield in_place_of(reply, sent.pop(i))


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

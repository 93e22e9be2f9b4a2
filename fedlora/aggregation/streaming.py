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
Each pull therefore runs in its own thread and its replies are always handed over; one that has not
said what it took within ``stall_seconds`` has its ids asked again in new pulls, so replies that
arrive after it are handed over as they come. An error answer for an id that a running pull may
still bring a reply to (the "not found" of a reply that pull took) waits for that pull, so a slow
pull's replies are never replaced by it. In a deployment a pull is split
(:mod:`fedlora.aggregation.split_pull`): it takes the replies in one call and downloads each in a
thread of its own, so a stuck upload holds back no reply taken with it. Without the split (a grid
other than Flower's ``HttpGrid``), replies taken by the same pull as a stuck upload wait with it,
and are named as missing if the round's timeout passes first.

Everything else (node ids, pushes, pulls, run info) is the wrapped grid's own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

from flwr.app import Message

from fedlora.aggregation.split_pull import SplitPull, split_pull_of


class StreamingGrid:
    """A ``Grid`` whose ``send_and_receive`` yields replies as they are pulled, at most ``max_pull``
    per pull: Flower's grids return every reply that has arrived for the ids asked, so the ids are
    asked ``max_pull`` at a time, in turn, and replies that arrive faster than the consumer folds
    them wait at the SuperLink. Peak memory is then ``max_pull`` replies, not the backlog (plus
    those a stalled pull holds while its ids are asked again). Each reply is yielded once."""

    def __init__(
        self, grid, max_pull: int = 1_000_000, stall_seconds: float = 5.0, split: SplitPull | None = None
    ) -> None:
        if max_pull < 1:
            raise ValueError(f"max_pull must be >= 1, got {max_pull}")
        self._grid = grid
        self.max_pull = max_pull
        self.stall_seconds = stall_seconds
        self._split = split if split is not None else split_pull_of(grid)  # a deployment's grid: per-reply downloads

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
        held: dict[str, Message] = {}  # an error answer for an id a running pull may still bring a reply to

        def asked(i: str) -> bool:
            return any(p.holds(i) for p in running)

        def collect() -> Iterator[Message]:
            for pull in list(running):
                done = pull.done()  # asked first: a pull done now adds nothing after the drain below
                replies = pull.result()
                if done:
                    running.remove(pull)
                yield from _handed_over(replies, sent, held, asked)
            # ids no running pull can bring a reply to any more: the error held for them is their answer
            for i in [i for i in held if not asked(i)]:
                yield in_place_of(held.pop(i), sent.pop(i))

        while sent and (forever or time.time() < end):
            before = len(sent)
            yield from collect()
            # Awaited: an id a running pull will still answer (see _Pull.awaits). The others (not
            # answered, not held) are asked again: a stalled pull holds only what it took.
            now = time.monotonic()
            awaited = {i for p in running for i in p.ids if p.awaits(i, now, self.stall_seconds)}
            waiting = [i for i in sent if i not in held and i not in awaited]
            for start in range(0, len(waiting), self.max_pull):  # one sweep over the waiting ids
                pull = _Pull(self._grid, waiting[start : start + self.max_pull], self._split)
                running.append(pull)
                pull.wait_all(self.stall_seconds)  # downloads included: at most max_pull replies at once
                yield from collect()
            if sent and len(sent) == before:
                time.sleep(interval)
        # Past the timeout: what the running pulls bring within one more stall period is taken (a
        # reply that was there when the round ended); a stuck one is left, and named as no reply.
        grace_end = time.time() + self.stall_seconds
        for pull in list(running):
            pull.wait_all(max(grace_end - time.time(), 0.0))
        yield from collect()


class _Pull:
    """One pull of replies in a daemon thread, left behind if it is stuck (it ends when Flower gives
    the reply up) instead of holding the round. With a :class:`~fedlora.aggregation.split_pull.SplitPull`
    (a deployment) the thread only takes the replies (one call) and each reply taken downloads in a
    thread of its own, so a reply whose upload never completes holds back only itself; otherwise it
    is ``grid.pull_messages(ids)``, whole. Replies are handed over as they complete (:meth:`result`)."""

    def __init__(self, grid, ids: list[str], split: SplitPull | None) -> None:
        self.ids = frozenset(ids)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._replies: list[Message] = []
        self._pending: set[str] = set()  # ids taken whose reply is not handed over yet
        self._downloads: list[threading.Thread] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(grid, ids, split), daemon=True, name="fedlora-pull")
        self._thread.start()

    def _run(self, grid, ids: list[str], split: SplitPull | None) -> None:
        try:
            if split is None:
                replies = list(grid.pull_messages(ids))
                with self._lock:
                    self._pending.update(r.metadata.reply_to_message_id for r in replies)
                    self._replies.extend(replies)
                return
            for answered, fetch in split.take(ids):
                with self._lock:
                    self._pending.add(answered)
                download = threading.Thread(
                    target=self._download, args=(answered, fetch), daemon=True, name="fedlora-download"
                )
                self._downloads.append(download)
                download.start()
        except BaseException as exc:  # raised where the round reads the result
            self._error = exc

    def _download(self, answered: str, fetch) -> None:
        try:
            reply = fetch()
        except BaseException as exc:
            self._error = exc
            return
        with self._lock:
            if reply is None:  # one the grid does not hear: this pull brings nothing for it
                self._pending.discard(answered)
            else:
                self._replies.append(reply)

    def taken(self) -> bool:
        """Whether it knows what it took (without a split: once the whole pull has returned)."""
        return not self._thread.is_alive()

    def done(self) -> bool:
        return self.taken() and not any(d.is_alive() for d in self._downloads)

    def holds(self, i: str) -> bool:
        """Whether this pull may still hand over a reply to ``i``."""
        with self._lock:
            return i in self.ids and (not self.taken() or i in self._pending)

    def awaits(self, i: str, now: float, stall_seconds: float) -> bool:
        """Whether ``i`` is left to this pull rather than asked again: a reply it took (asked again,
        Flower answers "not found"), or, until it knows what it took, any of its ids while it has not
        stalled, or its one id (asked alone, it stalls on that reply)."""
        if self.taken():
            return self.holds(i)
        return i in self.ids and (len(self.ids) == 1 or now - self.started <= stall_seconds)

    def wait_all(self, seconds: float) -> None:
        """Until the pull and every download it started have ended, or ``seconds`` have passed."""
        end = time.monotonic() + seconds
        self._thread.join(seconds)
        for download in list(self._downloads):
            download.join(max(end - time.monotonic(), 0.0))

    def result(self) -> list[Message]:
        """The replies completed since the last call."""
        if self._error is not None:
            raise self._error
        with self._lock:
            replies, self._replies = self._replies, []
            self._pending.difference_update(r.metadata.reply_to_message_id for r in replies)
        return replies


def _handed_over(
    replies: list[Message], sent: dict[str, Message | None], held: dict[str, Message], asked
) -> Iterator[Message]:
    """Each reply to a message still awaited, as from the node it was sent to (:func:`in_place_of`);
    one already handed over is dropped, and an error for an id that a running pull may still bring a
    reply to (``asked(id)``) is kept in ``held`` until none can."""
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

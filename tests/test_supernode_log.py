"""The SuperNode's verdict on each message it received, read from its log, and the resident
executor's reply guard built on it: a reply to a message the SuperNode let go is never pushed.

The log lines are Flower 1.42's own, as a device's ``supernode.log`` holds them (colour codes
included). The guard's race (a run stopped between the SuperNode's pull of a message's content and
its confirmation) cannot be provoked on demand in a real deployment, so its test hands the guard a
log that records that verdict and a recorder in place of Flower's push to the SuperNode."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.deploy.supernode_log import DROPPED, KEPT, PENDING, await_verdict, message_verdict

INFO, ERROR, WARN = "\x1b[92mINFO \x1b[0m:      ", "\x1b[91mERROR \x1b[0m:     ", "\x1b[93mWARNING \x1b[0m:   "
RUN = 5261808027722606719


def receipt(mid: str, kind: str = "train") -> list[str]:
    return [f"{INFO}", f"{INFO}[RUN {RUN}]", f"{INFO}Receiving: {kind} message (ID: {mid})"]


VERDICT_LINES = {
    KEPT: lambda mid: [f"{INFO}Received successfully"],
    "ignored": lambda mid: [f"{INFO}Run ID {RUN} is not in `RUNNING` status. Ignoring message {mid}."],
    "failed": lambda mid: [f"{ERROR}Failed to receive message {mid}: <_InactiveRpcError ...>"],
    PENDING: lambda mid: [],
}
NOISE = st.sampled_from(
    [
        f"{WARN}Connection attempt failed, retrying in 0.68 seconds",
        f"{INFO}Connection successful after 5.81 seconds and 5 tries.",
        f"{INFO}",
        f"{INFO}Sending: train message (ID: {'e' * 64})",
        f"{INFO}Sent successfully",
        f"{INFO}Run ID {RUN} is not in `RUNNING` status. Ignoring reply message {'f' * 64}.",
    ]
)


def test_the_logs_that_ci_left_read_as_the_supernode_decided():
    # The resumed run of the failed CI job: the killed run's message let go, the new run's kept.
    stale, setup = "c32451ff" + "0" * 56, "affb6aa1" + "0" * 56
    text = "\n".join(
        [f"{WARN}Connection attempt failed, retrying in 3.67 seconds"]
        + receipt(stale)
        + VERDICT_LINES["ignored"](stale)
        + receipt(setup, "query")
        + VERDICT_LINES[KEPT](setup)
    )
    assert message_verdict(text, stale) == DROPPED
    assert message_verdict(text, setup) == KEPT
    assert message_verdict(text, "9" * 64) is None  # never received here
    # A receipt cut by an outage: retries, then the verdict once the server answers again.
    cut = "\n".join(receipt(stale) + [f"{WARN}Connection attempt failed, retrying in 0.68 seconds"] * 3)
    assert message_verdict(cut, stale) == PENDING
    assert message_verdict(cut + "\n" + VERDICT_LINES["ignored"](stale)[0], stale) == DROPPED


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(sorted(VERDICT_LINES)), st.lists(NOISE, max_size=3)), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_each_message_gets_its_own_verdict_whatever_comes_around_it(messages, rnd):
    """Messages received in turn (only the last may still wait for its verdict), with connection
    retries, sends and blank lines between: each id reads as its own verdict, never a neighbour's."""
    lines, expected = [], {}
    for i, (verdict, noise) in enumerate(messages):
        if verdict == PENDING and i < len(messages) - 1:
            verdict = KEPT  # the SuperNode receives the next message only after a verdict
        mid = f"{rnd.getrandbits(256):064x}"
        lines += receipt(mid) + noise + VERDICT_LINES[verdict](mid)
        expected[mid] = verdict if verdict in (KEPT, PENDING) else DROPPED
    text = "\n".join(lines)
    assert {mid: message_verdict(text, mid) for mid in expected} == expected


def test_a_message_received_again_is_judged_by_its_last_receipt():
    mid = "a" * 64
    text = "\n".join(receipt(mid) + VERDICT_LINES["failed"](mid) + receipt(mid) + VERDICT_LINES[KEPT](mid))
    assert message_verdict(text, mid) == KEPT
    assert message_verdict("\n".join(receipt(mid) + VERDICT_LINES[KEPT](mid) + receipt(mid)), mid) == PENDING


def test_await_verdict_waits_while_pending_and_no_longer_than_its_limit(tmp_path):
    log, mid = tmp_path / "supernode.log", "b" * 64
    assert await_verdict(log, mid, timeout=5) is None  # no log: at once
    log.write_text("\n".join(receipt("c" * 64) + VERDICT_LINES[KEPT]("c" * 64)))
    t0 = time.monotonic()
    assert await_verdict(log, mid, timeout=5) is None and time.monotonic() - t0 < 1  # no receipt: at once
    log.write_text("\n".join(receipt(mid)))
    t0 = time.monotonic()
    assert await_verdict(log, mid, timeout=0.3) == PENDING and time.monotonic() - t0 >= 0.3


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """The guard installed over a recorder in place of Flower's push; yields (log path, pushed ids)."""
    from flwr.supernode.runtime import run_clientapp as flower_task

    from fedlora.deploy.executor import withhold_replies_to_dropped_messages

    pushed: list[str] = []
    monkeypatch.setattr(
        flower_task, "push_message", lambda client, reply, ctx: pushed.append(reply.metadata.reply_to_message_id)
    )
    log = tmp_path / "supernode.log"
    withhold_replies_to_dropped_messages(log, wait=0.5)
    withhold_replies_to_dropped_messages(log, wait=0.5)  # installing it again wraps nothing twice
    assert getattr(flower_task.push_message, "node_log", None) == log
    return log, pushed, flower_task


def reply_to(mid: str):
    from flwr.app import RecordDict

    from fleet import train_reply

    return train_reply(2, RecordDict(), "r" * 64, reply_to=mid)


def test_a_reply_to_a_message_the_supernode_let_go_is_withheld_and_others_go_out(guarded):
    log, pushed, flower_task = guarded
    stale, kept, unknown = "1" * 64, "2" * 64, "3" * 64
    log.write_text(
        "\n".join(receipt(stale) + VERDICT_LINES["ignored"](stale) + receipt(kept) + VERDICT_LINES[KEPT](kept))
    )
    for mid in (stale, kept, unknown):
        flower_task.push_message(None, reply_to(mid), None)
    assert pushed == [kept, unknown]  # a receipt the log lacks goes out as Flower would send it


def test_a_reply_waits_for_the_verdict_that_comes_after_it(guarded):
    import threading

    log, pushed, flower_task = guarded
    mid = "4" * 64
    log.write_text("\n".join(receipt(mid)))  # the SuperNode still confirming it with a slow server
    later = threading.Timer(0.2, lambda: log.write_text(log.read_text() + "\n" + VERDICT_LINES["ignored"](mid)[0]))
    later.start()
    flower_task.push_message(None, reply_to(mid), None)
    later.join()
    assert pushed == []

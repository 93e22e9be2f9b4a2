"""What fedlora reads in Flower's SuperNode log (flwr 1.41-1.42), in one place: whether the node
joined, lost or was refused by its server (the device's console notes), and whether the SuperNode
kept a message it received (the resident executor's reply guard).

The SuperNode receives one message at a time and logs each as ``Receiving: <type> message (ID: <id>)``
followed by its verdict: ``Received successfully``, or a line naming the id when it let the message
go (its run no longer running, or its content not pulled). Its log handler flushes every line.
"""

from __future__ import annotations

import time
from pathlib import Path

# Its node id once it has joined (the first connection that succeeds), a success after failed tries, a
# failed try, a refused activation (its key is not enrolled there).
CONNECTED = ("SuperNode ID:", "Connection successful")
UNREACHABLE = "Connection attempt failed"
NOT_ENROLLED = "Failed to activate SuperNode"

NODE_LOG = "supernode.log"  # in the device's state folder, where `fedlora client` writes it
KEPT, DROPPED, PENDING = "kept", "dropped", "pending"
_RECEIVING = "Receiving: "
_KEPT_LINE = "Received successfully"
_DROPPED_LINES = ("Ignoring message {id}", "Failed to receive message {id}")


def message_verdict(log_text: str, message_id: str) -> str | None:
    """:data:`KEPT` or :data:`DROPPED` for the SuperNode's last receipt of ``message_id`` in
    ``log_text``, :data:`PENDING` while it has not said, None if the log shows no receipt of that id.
    The first verdict line after the receipt is that message's: the SuperNode receives the next
    message only after it."""
    start = log_text.rfind(f"message (ID: {message_id})")
    if start < 0 or _RECEIVING not in log_text[log_text.rfind("\n", 0, start) + 1 : start]:
        return None
    after = log_text[start:]
    found = [(after.find(line.format(id=message_id)), DROPPED) for line in _DROPPED_LINES]
    found.append((after.find(_KEPT_LINE), KEPT))
    said = [(at, verdict) for at, verdict in found if at >= 0]
    return min(said)[1] if said else PENDING


def await_verdict(node_log: Path, message_id: str, timeout: float, every: float = 0.05) -> str | None:
    """:func:`message_verdict` from the log file, asked again while it is :data:`PENDING` until
    ``timeout`` seconds pass (a receipt whose verdict waits on a server that is down can take that
    long); None at once without a log or a receipt in it. Each read is the whole log, so the pause
    between reads doubles from ``every`` to at most a second."""
    deadline = time.monotonic() + timeout
    while True:
        if not node_log.exists():
            return None
        verdict = message_verdict(node_log.read_text(errors="replace"), message_id)
        left = deadline - time.monotonic()
        if verdict != PENDING or left <= 0:
            return verdict
        time.sleep(min(every, left))
        every = min(2 * every, 1.0)

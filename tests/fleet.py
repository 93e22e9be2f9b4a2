"""Helpers for tests that run real Flower simulations: a recording Grid and misbehaving clients.

Registered with cloudpickle by value, so Ray's workers receive these functions without needing
the tests folder on their import path.
"""

from __future__ import annotations

import math

import torch
from flwr.app import Message
from flwr.clientapp import ClientApp

from fedlora import codec


class RecordingGrid:
    """Flower's Grid, unchanged, but keeps every message sent and every reply received."""

    def __init__(self, grid) -> None:  # noqa: ANN001
        self._grid = grid
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def __getattr__(self, name):  # noqa: ANN001, ANN204
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        messages = list(messages)
        self.sent.extend(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.received.extend(replies)
        return replies


def misbehaving_app(bad: dict[int, str]) -> ClientApp:
    """fedlora's ClientApp, except that partition p corrupts its train reply as ``bad[p]`` says:
    'leak-b' (adds a B tensor), 'nan' (a NaN in A), 'shape' (drops a row of A), 'rank' (reports
    a wrong rank), 'weight' (claims 1e12 examples)."""
    from fedlora.clients.app import app as real

    app = ClientApp()

    @app.query()
    def q(msg: Message, context):  # noqa: ANN001, ANN202
        return real(msg, context)

    @app.evaluate()
    def e(msg: Message, context):  # noqa: ANN001, ANN202
        return real(msg, context)

    @app.train()
    def t(msg: Message, context):  # noqa: ANN001, ANN202
        reply = real(msg, context)
        how = bad.get(int(context.node_config["partition-id"]))
        arrays = reply.content["arrays"]
        key = next(k for k in arrays.keys() if k.endswith("/A"))
        a = codec.decode_tensor(key, arrays[key])
        if how == "leak-b":
            arrays[key[:-2] + "/B"] = codec.encode_tensor(torch.zeros(a.shape[1], a.shape[0]))
        elif how == "nan":
            a[0, 0] = math.nan
            arrays[key] = codec.encode_tensor(a)
        elif how == "shape":
            arrays[key] = codec.encode_tensor(a[1:])
        elif how == "rank":
            reply.content["metrics"]["rank"] = a.shape[0] + 1
        elif how == "weight":
            reply.content["metrics"]["num-examples"] = 10**12
        return reply

    return app

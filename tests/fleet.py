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
    """Flower's Grid, unchanged, but keeps every message pushed and every reply pulled (the server
    wraps it in its StreamingGrid, which pushes and pulls through it)."""

    def __init__(self, grid) -> None:
        self._grid = grid
        self.sent: list[Message] = []
        self.received: list[Message] = []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.extend(messages)
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self.received.extend(replies)
        return replies

    def train_replies(self) -> list[Message]:
        """Every train reply pulled, in arrival order."""
        from flwr.app import MessageType

        return [m for m in self.received if m.metadata.message_type == MessageType.TRAIN]


def run_recorded(cfg, **kw):
    """``fedlora.simulate.simulate(cfg, **kw)`` on a :class:`RecordingGrid`: the run directory, its
    metrics rows and the grid that saw every message."""
    from fedlora.simulate import simulate

    box = {}

    def wrap(grid):
        box["grid"] = RecordingGrid(grid)
        return box["grid"]

    run_dir = simulate(cfg, wrap_grid=wrap, **kw)
    return run_dir, run_dir.read_metrics(), box["grid"]

    def send_and_receive(self, messages, *, timeout=None):
        from fedlora.aggregation.streaming import StreamingGrid

        return list(StreamingGrid(self).send_and_receive(messages, timeout=timeout))


def hostile_app(bad: dict[int, set[str] | str]) -> ClientApp:
    """fedlora's ClientApp, except that partition p misbehaves in the ways ``bad[p]`` names.

    Train replies: 'leak-b' (adds a B, which FedSA keeps private), 'nan' (a NaN in A), 'shape'
    (drops a row of A), 'rank' (reports its rank + 1), 'weight' (claims 1e12 examples), 'drop-b' (one module's B missing), 'drop-bias' (the head's bias missing),
    'rank-nan', 'rank-inf', 'rank-frac' (4.7), 'examples-frac' (2.5), 'examples-cap' (claims the
    federation's declared-size cap), 'base-key' (a FLoRA key outside FLoRA), 'scale-1e6' (every
    tensor x1e6), 'boost' (start + 1e6 x its own change), 'flip' (start - its own change), 'near-max' (every value 3e38), 'crash' (raises), 'slow' (sleeps 47 s from
    round 2). Evaluation: 'eval-no-accuracy', 'eval-out-of-range'. Setup profile:
    'profile-rank-double', 'profile-rank-zero', 'profile-rank-string', 'profile-size-1e12',
    'profile-alpha-nan', 'profile-alpha-big', 'profile-dup-id' (claims client-00000's id)."""
    from fedlora.clients.app import app as real

    app = ClientApp()

    def how(context) -> set[str]:
        b = bad.get(int(context.node_config["partition-id"]), set())
        return {b} if isinstance(b, str) else set(b)

    @app.query()
    def q(msg: Message, context):
        reply = real(msg, context)
        h = how(context)
        prof = reply.content["profile"]
        if "profile-rank-double" in h:
            prof["rank"] = int(prof["rank"]) * 2
        if "profile-rank-zero" in h:
            prof["rank"] = 0
        if "profile-rank-string" in h:
            prof["rank"] = str(prof["rank"])
        if "profile-size-1e12" in h:
            prof["num_train"] = 10**12
        if "profile-alpha-nan" in h:
            prof["alpha"] = math.nan
        if "profile-alpha-big" in h:
            prof["alpha"] = 1e6
        if "profile-dup-id" in h:
            prof["client_id"] = "client-00000"
        return reply

    @app.evaluate()
    def e(msg: Message, context):
        reply = real(msg, context)
        h = how(context)
        m = reply.content["metrics"]
        if "eval-no-accuracy" in h:
            del m["accuracy"]
        if "eval-out-of-range" in h:
            m["accuracy"], m["loss"], m["num-examples"] = 5.0, math.nan, -100
        return reply

    @app.train()
    def t(msg: Message, context):
        h = how(context)
        if "crash" in h:
            raise ValueError("disk on fire")
        if "slow" in h and int(msg.content["config"]["server-round"]) >= 2:
            import time

            time.sleep(47)  # past the test's 45 s round_timeout; the engine waits for it before it ends
        reply = real(msg, context)
        arrays, metrics = reply.content["arrays"], reply.content["metrics"]
        key_a = next(k for k in arrays.keys() if k.endswith("/A"))
        if "leak-b" in h:
            a = codec.decode_tensor(key_a, arrays[key_a])
            arrays[key_a[:-2] + "/B"] = codec.encode_tensor(torch.zeros(a.shape[1], a.shape[0]))
        if "nan" in h:
            a = codec.decode_tensor(key_a, arrays[key_a])
            a[0, 0] = math.nan
            arrays[key_a] = codec.encode_tensor(a)
        if "shape" in h:
            arrays[key_a] = codec.encode_tensor(codec.decode_tensor(key_a, arrays[key_a])[1:])
        if "rank" in h:
            metrics["rank"] = int(metrics["rank"]) + 1
        if "weight" in h:
            metrics["num-examples"] = 10**12
        if "drop-b" in h:
            del arrays[next(k for k in arrays.keys() if k.endswith("/B"))]
        if "drop-bias" in h:
            del arrays["head/classifier.bias"]
        if "rank-nan" in h:
            metrics["rank"] = math.nan
        if "rank-inf" in h:
            metrics["rank"] = math.inf
        if "rank-frac" in h:
            metrics["rank"] = 4.7
        if "examples-frac" in h:
            metrics["num-examples"] = 2.5
        if "examples-cap" in h:
            metrics["num-examples"] = 1000
        if "base-key" in h:
            arrays["base/" + key_a] = arrays[key_a]
        for key in list(arrays.keys()):
            if "scale-1e6" in h:
                arrays[key] = codec.encode_tensor(codec.decode_tensor(key, arrays[key]) * 1e6)
            if "near-max" in h:
                arrays[key] = codec.encode_tensor(torch.full(tuple(arrays[key].shape), 3e38))
            if "boost" in h and key in msg.content["arrays"].keys():  # start + 1e6 x its own change
                start = codec.decode_tensor(key, msg.content["arrays"][key])
                new = codec.decode_tensor(key, arrays[key])
                arrays[key] = codec.encode_tensor(start + 1e6 * (new - start))
            if "flip" in h and key in msg.content["arrays"].keys():  # start - its own change: inside every bound
                start = codec.decode_tensor(key, msg.content["arrays"][key])
                arrays[key] = codec.encode_tensor(2 * start - codec.decode_tensor(key, arrays[key]))
        return reply

    return app


def train_reply(src_node: int, content, message_id: str, reply_to: str = "x") -> Message:
    """A train reply as a node's ClientApp would send it: ``content`` from ``src_node`` to the
    server (node 0), answering message ``reply_to``, with the metadata Flower's grids fill in."""
    import time

    from flwr.app import Metadata

    md = Metadata(
        run_id=1,
        message_id=message_id,
        src_node_id=src_node,
        dst_node_id=0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=md)

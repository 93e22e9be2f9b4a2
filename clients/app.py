"""fedlora's ClientApp: trains the run's LoRA on the client's own data and replies with factors.

A client obeys the strategy's :class:`~fedlora.sharing.SharingPolicy`: it sends the shared parts,
keeps the private ones in its client-state store and never trains the frozen ones; it holds no
strategy-specific branches, and every method that shapes its training (DP-SGD, DyLoRA's rank, a
continual method, a plug-in) does so through the hooks of :mod:`fedlora.extensions`. Heavy work
(model build, tokenization) is cached per process.

Node config keys (deployment; in simulation Flower sets ``partition-id``):
``partition-id``, ``client-id``, ``rank``, ``device-class``, ``state-dir``, ``data`` (the device's own
data; without it, partition ``partition-id`` of the run's dataset).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import codec
from fedlora.clients.session import ClientSession
from fedlora.data import load_task
from fedlora.protocol import ARRAYS, CONFIG, METRICS, PROFILE, SETUP
from fedlora.training import evaluate as run_eval
from fedlora.training import train_local

app = ClientApp()


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Receive the run config once; answer with this node's profile (identity, rank, data sizes)."""
    config = msg.content[CONFIG]
    if config.get("action") != SETUP:
        raise ValueError(f"unknown query action {config.get('action')!r}")
    names = json.loads(str(config["label-names"])) if "label-names" in config else None
    try:
        ClientSession.remember_config(context, str(config["run-config"]), names)
        session = ClientSession.from_context(context)
    except Exception as exc:
        # The server knows this node only by number until its profile arrives: name the client in the
        # error Flower carries back, so the operator reads who failed, and why.
        cid = (
            str(context.node_config.get("client-id", "")) or f"partition {context.node_config.get('partition-id', '?')}"
        )
        raise RuntimeError(f"client {cid}: {exc}") from exc
    ClientSession.persist_setup(context)
    return Message(RecordDict({PROFILE: ConfigRecord(session.profile.to_record())}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:

    t0 = time.perf_counter()
    config = msg.content[CONFIG]
    server_round = int(config["server-round"])
    session = ClientSession.from_context(context, str(config.get("config-digest", "")) or None)
    session.use_round(server_round)
    received = msg.content[ARRAYS]
    model = session.model()
    incoming = session.prepare(model, received, server_round)
    client = session.client_round(model, received, incoming, server_round, dict(config))
    params = [p for p in model.parameters() if p.requires_grad]
    with ExitStack() as extensions:
        hooks = [h for ext in session.extensions for h in extensions.enter_context(ext.training(client))]
        result = train_local(
            model,
            params,
            session.data.train,
            session.cfg.train,
            seed=session.cfg.run.seed * 100_003 + server_round * 1009 + session.profile.partition_id,
            device=session.device,
            hooks=hooks,
        )
    out = session.finish_training(model)
    for ext in session.extensions:
        out = ext.reply_factors(client, out)
    arrays = codec.encode(out, session.cfg.federation.wire_dtype, modules=session.modules)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
            "client-seconds": time.perf_counter() - t0,
            "bytes-down": codec.wire_bytes(received),
            "bytes-up": codec.wire_bytes(arrays),
            "rank": int(next(iter(out.modules.values())).rank) if out.modules else session.profile.rank,
            "partition-id": session.profile.partition_id,
            **{k: float(v) for k, v in result.metrics.items()},
            **{k: v for ext in session.extensions for k, v in ext.reply_metrics(client).items()},
        }
    )
    return Message(RecordDict({ARRAYS: arrays, METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Personalized evaluation: the global parts plus this client's private parts, on its own test split."""

    config = msg.content[CONFIG]
    server_round = int(config["server-round"])
    session = ClientSession.from_context(context, str(config.get("config-digest", "")) or None)
    session.use_round(server_round)
    model = session.model()
    incoming = session.prepare(model, msg.content[ARRAYS], server_round)
    client = session.client_round(model, msg.content[ARRAYS], incoming, server_round, dict(config))
    bs = session.cfg.train.eval_batch_size
    with ExitStack() as extensions:
        for ext in session.extensions:
            extensions.enter_context(ext.evaluating(client))
        local = run_eval(model, session.data.test, bs, session.device)
        metrics = {
            "num-examples": local["num-examples"],
            "loss": local["loss"],
            "partition-id": session.profile.partition_id,
            **{k: v for ext in session.extensions for k, v in ext.reply_metrics(client).items()},
        }
        # Accuracy: classification, or a causal LM's generated labels; free-form instructions have loss only.
        if "accuracy" in local:
            metrics["accuracy"] = local["accuracy"]
        if session.data.val is not None and len(session.data.val):
            val = run_eval(model, session.data.val, bs, session.device)
            metrics.update({"val-accuracy": val["accuracy"]} if "accuracy" in val else {"val-loss": val["loss"]})
        # A device with its own data never reads the run's data.dataset (a path the server chose).
        if bool(config.get("global-view", False)) and not str(context.node_config.get("data", "")):
            # The personalized model on the held-out set every client shares: how far it generalises.
            glob = run_eval(model, load_task(session.cfg).test, bs, session.device)
            if "accuracy" in glob:
                metrics["global-accuracy"] = glob["accuracy"]
        if bool(config.get("save-adapter", False)):
            session.save_personal_adapter(model)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)

"""Wire efficiency: bytes per client-round at the message layer vs the raw bytes of the factors.

For each strategy and wire dtype, the real server strategy builds the train message for a client
and the real ClientApp handles it (one local step of the packaged MiniLM) and replies; both
messages are serialised as Flower does (protobuf, metadata and keys included) and divided by the
raw bytes of what the strategy's policy sends. The reference is a full-model FedAvg message of the
same model (``ArrayRecord(model.state_dict())``, float32 numpy arrays), measured the same way.
"""

from __future__ import annotations

import time

from benchmarks.common import SHARED_DATA, plot_bars, set_task_identity, write

STRATEGIES = ["fedit", "fedsa", "ffa", "hetlora", "flora", "flexlora"]
DTYPES = ["float32", "float16", "bfloat16"]
GOAL = 1.02


def _config(strategy: str, dtype: str, tmp: str):
    from fedlora.config import FedLoraConfig

    het = strategy in ("hetlora", "flora", "flexlora")
    return FedLoraConfig.from_dict(
        {
            "run": {"output_dir": tmp, "rounds": 1},
            "model": {"name": "builtin:all-MiniLM-L6-v2", "max_length": 32},
            "lora": {"rank": 8, "alpha": 16},
            "data": {
                "dataset": str(SHARED_DATA / "agnews"),
                "max_train_examples": 200,
                "max_test_examples": 50,
                "partitioner": "iid",
            },
            "federation": {"strategy": strategy, "num_clients": 4, "wire_dtype": dtype},
            "train": {"local_steps": 1, "batch_size": 4},
            "hetero": {"client_ranks": [8, 16, 8, 16]} if het else {},
            "simulation": {"state_dir": f"{tmp}/state"},
        }
    )


def run(quick: bool = False) -> dict:
    import tempfile

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from fedlora import codec
    from fedlora.clients.app import app
    from fedlora.lora_math import to_effective
    from fedlora.protocol import NodeProfile
    from fedlora.registry import get_strategy
    from fedlora.server.global_model import GlobalModel, reference_rank

    set_task_identity()
    rows = []
    tmp = tempfile.mkdtemp(prefix="fedlora-wire-")
    for strategy in STRATEGIES:
        for dtype in DTYPES[:2] if quick else DTYPES:
            cfg = _config(strategy, dtype, tmp)
            from fedlora.data import load_task

            gm = GlobalModel(cfg, load_task(cfg).label_names, reference_rank(cfg))
            strat = get_strategy(strategy)(cfg, gm.template())
            strat.global_eff = strat.initial_global(to_effective(gm.init))
            ctx = Context(run_id=1, node_id=11, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
            setup = Message(
                RecordDict({"config": ConfigRecord({"action": "setup", "run-config": cfg.to_json()})}),
                dst_node_id=11,
                message_type=MessageType.QUERY,
            )
            prof = NodeProfile.from_record(dict(app(setup, ctx).content["profile"]))
            strat.profiles[11] = prof
            (down_msg,) = strat._messages([11], 1, ConfigRecord(), MessageType.TRAIN, None, {})
            reply = app(down_msg, ctx)
            up_payload = reply.content["arrays"]
            update = strat.validate_reply(prof, reply.content)  # the server accepts it
            raw_up = codec.raw_bytes(update.factors, dtype)
            rows.append(
                {
                    "strategy": strategy,
                    "dtype": dtype,
                    "client-rank": prof.rank,
                    "raw-up": raw_up,
                    "message-up": codec.message_bytes(reply),
                    "payload-up": codec.wire_bytes(up_payload),
                    "raw-down": codec.wire_bytes(down_msg.content["arrays"]),
                    "message-down": codec.message_bytes(down_msg),
                }
            )
            r = rows[-1]
            r["ratio-up"] = r["message-up"] / r["raw-up"]
            r["ratio-down"] = r["message-down"] / max(r["raw-down"], 1)
            print(
                f"  wire {strategy:9s} {dtype:9s} up {r['message-up']:>9,} B / raw {r['raw-up']:>9,} B = "
                f"{r['ratio-up']:.4f}",
                flush=True,
            )
    # Full-model FedAvg of the same model: every parameter, float32, Flower's default numpy arrays.
    model = gm.model
    full_sd = {k: v.detach().cpu() for k, v in model.get_base_model().state_dict().items()}
    full_rec = ArrayRecord(full_sd)
    full_raw = sum(t.numel() * t.element_size() for t in full_sd.values())
    full_msg = Message(RecordDict({"arrays": full_rec}), dst_node_id=11, message_type=MessageType.TRAIN)
    full = {"raw": full_raw, "message": codec.message_bytes(full_msg)}
    for r in rows:
        r["full-model-over-ours"] = full["message"] / r["message-up"]
    plot_bars(
        write_path("wire.png"),
        "bytes on the wire / raw factor bytes (upload, per client-round)",
        [f"{r['strategy']}/{r['dtype']}" for r in rows],
        [r["ratio-up"] for r in rows],
        GOAL,
        "ratio",
    )
    payload = {
        "goal": GOAL,
        "rows": rows,
        "full_model_fedavg": full,
        "model": "all-MiniLM-L6-v2, LoRA r=8 (q,v), 4-label head",
        "time": time.strftime("%H:%M:%S"),
    }
    write("wire", payload)
    return payload


def write_path(name: str):
    from benchmarks.common import RESULTS

    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / name

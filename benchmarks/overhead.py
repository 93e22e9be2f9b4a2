"""Framework overhead: a `fedlora simulate` round vs a bare PyTorch + PEFT loop, same process run.

The simulation runs 10 clients per round (the packaged MiniLM, LoRA r=8, AG News from
../shared/data), training only (no evaluation), with Flower's simulation engine at its best
setting on 2 cores (2 Ray workers x 1 thread). The baseline does the same local training steps for
the same 10 clients one after another in this process, with all cores, reusing one model: no
Flower, no Ray, no serialisation. Round 1 carries Ray's start and is left out of the ratio.
The breakdown attributes the round's time to client training, client-side work around it, and
what remains (Flower's messaging, the server's aggregation and bookkeeping).
"""

from __future__ import annotations

import statistics
import tempfile
import time

from benchmarks.common import SHARED_DATA, write

GOAL = 1.15


def config(rounds: int, out: str):
    from fedlora.config import FedLoraConfig

    return FedLoraConfig.from_dict(
        {
            "run": {"name": "overhead", "output_dir": out, "rounds": rounds, "seed": 3},
            "model": {"name": "builtin:all-MiniLM-L6-v2", "max_length": 32},
            "lora": {"rank": 8, "alpha": 16},
            "data": {
                "dataset": str(SHARED_DATA / "agnews"),
                "max_train_examples": 1000,
                "max_test_examples": 100,
                "partitioner": "iid",
            },
            "federation": {"strategy": "fedit", "num_clients": 10, "fraction_evaluate": 0.0, "server_eval": False},
            "train": {"local_epochs": 1, "batch_size": 16, "learning_rate": 2e-3},
        }
    )


def bare_round(cfg) -> float:
    """The same local training for the same 10 clients, one after another, plain PyTorch + PEFT."""
    import torch

    from fedlora.data import load_task
    from fedlora.factors import load_factors
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors, set_trainable
    from fedlora.partitions import client_data
    from fedlora.training import train_local

    model = build_peft_model(
        cfg, load_task(cfg).num_labels, AdapterSpec(8, 16.0, cfg.lora.dropout, tuple(cfg.lora.target_modules))
    )
    init = initial_factors(model, cfg.lora.init_seed)
    t0 = time.perf_counter()
    for cid in range(cfg.federation.num_clients):
        load_factors(model, init)
        params = set_trainable(model, frozenset({"A", "B", "head"}))
        train_local(model, params, client_data(cfg, cid).train, cfg.train, seed=cid, device=torch.device("cpu"))
    return time.perf_counter() - t0


def run(quick: bool = False) -> dict:
    import torch

    from fedlora.simulate import simulate

    rounds = 3 if quick else 4
    cfg = config(rounds, tempfile.mkdtemp(prefix="fedlora-overhead-"))
    run_dir = simulate(cfg)
    rows = run_dir.read_metrics()
    steady = [r for r in rows if r["round"] >= 2]
    sim = statistics.mean(r["seconds"] for r in steady)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    bare = [bare_round(config(rounds, run_dir.path.as_posix())) for _ in range(2)]
    torch.set_num_threads(threads)
    bare_s = statistics.mean(bare)
    n = cfg.federation.num_clients
    train_s = statistics.mean(r["client-train-seconds"] for r in steady) * n  # summed over clients
    payload = {
        "goal": GOAL,
        "clients_per_round": n,
        "sim_round_seconds": [r["seconds"] for r in rows],
        "sim_steady_round_seconds": sim,
        "bare_round_seconds": bare,
        "bare_mean": bare_s,
        "ratio": sim / bare_s,
        "breakdown": {
            "client_training_seconds_summed": train_s,
            "client_training_seconds_on_2_workers": train_s / 2,
            "rest_of_round_seconds": sim - train_s / 2,
        },
    }
    print(f"  overhead: simulate round {sim:.2f}s vs bare loop {bare_s:.2f}s = {payload['ratio']:.3f} (goal <= {GOAL})")
    write("overhead", payload)
    return payload

"""Simulation scale: 100 vs 1000 virtual clients, 10 sampled per round.

Client state lives on disk (the client-state store), the base model and data are cached once per
worker process, so peak resident memory (this process plus every Ray worker, sampled every 0.2 s)
must not grow with the total number of clients. Tiny BERT keeps the round short so that what is
measured is the framework, not the model; FedSA is used so every client also writes and reads
private state.
"""

from __future__ import annotations

import statistics
import tempfile

from benchmarks.common import SHARED_DATA, PeakRSS, write


def config(num_clients: int, out: str):
    from fedlora.config import FedLoraConfig

    return FedLoraConfig.from_dict(
        {
            "run": {"name": f"scale-{num_clients}", "output_dir": out, "rounds": 4, "seed": 5},
            "model": {"name": "builtin:tiny-bert", "max_length": 32},
            "lora": {"rank": 4, "alpha": 8},
            "data": {
                "dataset": str(SHARED_DATA / "agnews"),
                "max_train_examples": 4000,
                "max_test_examples": 200,
                "partitioner": "iid",
                "local_test_fraction": 0.25,
            },
            "federation": {
                "strategy": "fedsa",
                "num_clients": num_clients,
                "fraction_train": 10 / num_clients,
                "min_train_clients": 10,
                "fraction_evaluate": 0.0,
                "server_eval": False,
            },
            "train": {"local_epochs": 1, "batch_size": 8},
        }
    )


def run(quick: bool = False) -> dict:
    from fedlora.simulate import simulate

    rows = []
    for n in (100, 1000):
        cfg = config(n, tempfile.mkdtemp(prefix="fedlora-scale-"))
        with PeakRSS() as mem:
            run_dir = simulate(cfg)
        metrics = run_dir.read_metrics()
        steady = [r["seconds"] for r in metrics if r["round"] >= 2]
        state_files = len(list((run_dir.path / "client_state").glob("*/private.pt")))
        rows.append(
            {
                "clients": n,
                "sampled_per_round": 10,
                "peak_rss_mb": mem.peak / 2**20,
                "seconds_per_round": statistics.mean(steady),
                "first_round_seconds": metrics[1]["seconds"],
                "clients_with_state_on_disk": state_files,
            }
        )
        print(
            f"  scale {n:5d} clients: peak RSS {mem.peak / 2**20:7.0f} MB, {statistics.mean(steady):.2f} s/round "
            f"(first {metrics[1]['seconds']:.1f} s), {state_files} client states on disk",
            flush=True,
        )
    payload = {
        "rows": rows,
        "rss_ratio_1000_over_100": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"],
        "round_time_ratio_1000_over_100": rows[1]["seconds_per_round"] / rows[0]["seconds_per_round"],
    }
    write("scale", payload)
    return payload

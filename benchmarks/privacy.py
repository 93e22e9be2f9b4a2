"""What differential privacy costs, measured on fedlora's own code paths, in one run.

* **DP-SGD per step**: the one training loop (:func:`fedlora.training.train_local`) on a client's
  share of AG News with the packaged all-MiniLM-L6-v2 (LoRA r=8 q,v, head trained, 48 tokens,
  batch 16), without and with the Opacus hook (:class:`fedlora.privacy.example_level.DPSGDHook`,
  noise 1.0, clip 1.0), both with and without DyLoRA's rank mask. Seconds per step, and the ratio
  DP-SGD / non-private (goal <= 2.5 on CPU).
* **Client-level DP per round**: the server's clipped, noised release
  (:class:`fedlora.privacy.client_level.ClientLevelDP`) against the plain weighted mean, at 50
  sampled MiniLM-shaped FedIT updates, and the accountant's update.

Writes benchmarks/results/privacy.json.
"""

from __future__ import annotations

import time

from benchmarks.common import SHARED_DATA, write


def _per_step(hooks_fn, rank: int | None, steps: int) -> float:
    import torch

    from fedlora.config import FedLoraConfig
    from fedlora.data import load_task
    from fedlora.dylora import RankMask
    from fedlora.factors import load_factors
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors, set_trainable
    from fedlora.training import train_local

    cfg = FedLoraConfig.from_dict(
        {
            "model": {"name": "builtin:all-MiniLM-L6-v2", "max_length": 48},
            "data": {"dataset": str(SHARED_DATA / "agnews"), "max_train_examples": 800, "max_test_examples": 64},
            "train": {"batch_size": 16, "local_steps": steps, "learning_rate": 3e-3},
        }
    )
    task = load_task(cfg)
    model = build_peft_model(cfg, task.num_labels, AdapterSpec(8, 16.0, 0.0, ("query", "value")))
    load_factors(model, initial_factors(model, 1))
    params = set_trainable(model, frozenset({"A", "B", "head"}))
    mask = RankMask(model)
    try:
        mask.set(rank)
        t0 = time.perf_counter()
        res = train_local(model, params, task.train, cfg.train, seed=1, device=torch.device("cpu"), hooks=hooks_fn())
        return (time.perf_counter() - t0) / res.steps
    finally:
        mask.remove()


def run(quick: bool = False) -> dict:
    import torch

    from fedlora.privacy.example_level import DPSGDHook

    torch.set_num_threads(2)
    steps = 6 if quick else 20
    _per_step(lambda: [], None, 2)  # warm-up: model load, tokenization
    rows = {}
    for name, hooks, rank in (
        ("lora", lambda: [], None),
        ("dylora", lambda: [], 4),
        ("dp-sgd", lambda: [DPSGDHook(1.0, 1.0, 1e-5, noise_seed=0)], None),
        ("dp-sgd+dylora", lambda: [DPSGDHook(1.0, 1.0, 1e-5, noise_seed=0)], 4),
    ):
        rows[name] = _per_step(hooks, rank, steps)
        print(name, f"{rows[name]:.3f} s/step", flush=True)
    ratio = rows["dp-sgd"] / rows["lora"]
    server = _server_round()
    print(f"DP-SGD / non-private per step: {ratio:.2f}x; server round {server}", flush=True)
    out = {
        "seconds_per_step": rows,
        "dp_sgd_over_plain": ratio,
        "goal": 2.5,
        "dp_sgd_dylora_over_dylora": rows["dp-sgd+dylora"] / rows["dylora"],
        "server": server,
    }
    write("privacy", out)
    return out


def _server_round(clients: int = 50) -> dict:
    from benchmarks.aggregation import pool
    from fedlora.config import FedLoraConfig
    from fedlora.lora_math import to_effective, weighted_mean
    from fedlora.privacy.client_level import ClientLevelDP

    ups = pool("minilm", 8)
    ups = [ups[i % len(ups)] for i in range(clients)]
    cfg = FedLoraConfig.load(
        None,
        [
            "privacy.client_dp=true",
            "federation.num_clients=500",
            "federation.fraction_train=0.1",
            "privacy.noise_seed=0",
        ],
    )
    dp = ClientLevelDP(cfg)
    start = ups[0].clone()
    eff = [to_effective(u) for u in ups]
    t0 = time.perf_counter()
    weighted_mean(eff, [1.0] * clients)
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    dp.release(to_effective(start), [start] * clients, ups, clients, 1, 8)
    private = time.perf_counter() - t0
    return {"clients": clients, "plain_mean_s": plain, "dp_release_s": private, "ratio": private / plain}


if __name__ == "__main__":
    run()

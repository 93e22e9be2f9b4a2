"""Causal-LM instruction tuning: local training speed and memory, and a federation's rounds.

1. *Local*: one client's training loop (fedlora's own ``train_local``) on AG News phrased as
   instructions (../shared/data): seconds per step, tokens per second (every attended token, and
   the scored response tokens), peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: the
   process's peak RSS), for each model given (``--models``; default the two builtin decoders,
   random weights: mechanics, not quality).
2. *Federation*: ``fedlora simulate`` on ``simulations/causal_agnews.toml`` (tiny LLaMA, 6 clients,
   Dirichlet 0.5, FedIT): seconds per round, held-out loss, perplexity and generated-label
   accuracy per round.

    .venv/bin/python -m benchmarks.run --only causal
    .venv/bin/python -m benchmarks.causal --device cuda --models Qwen/Qwen2.5-0.5B-Instruct --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

from benchmarks.common import RESULTS, ROOT, SHARED_DATA, setup_env, write

DEFAULT_MODELS = ("builtin:tiny-gpt2", "builtin:tiny-llama")


def TokenCounter():
    """Counts the tokens of the batches the training loop takes."""
    from fedlora.tasks.causal_maths import IGNORE
    from fedlora.training import TrainingHook

    class _TokenCounter(TrainingHook):
        attended = 0  # every token the model attends to (attention mask)
        scored = 0  # response tokens the loss is taken on

        def begin(self, ctx) -> None:
            source = ctx.batch_source
            ctx.batch_source = lambda epoch: self._count(source(epoch))

        def _count(self, items):
            for item in items:
                if item is not None:
                    batch, labels = item
                    self.attended += int(batch["attention_mask"].sum())
                    self.scored += int((labels[:, 1:] != IGNORE).sum())
                yield item

    return _TokenCounter()


def _config(model: str, device: str, dtype: str, quantization: str, steps: int, batch: int, max_length: int):
    from fedlora.config import FedLoraConfig

    return FedLoraConfig.from_dict(
        {
            "model": {
                "name": model,
                "task": "causal-lm",
                "max_length": max_length,
                "dtype": dtype,
                "quantization": quantization,
            },
            "lora": {"rank": 16, "alpha": 32},
            "data": {
                "dataset": str(SHARED_DATA / "agnews"),
                "max_train_examples": max(steps * batch * 2, 400),
                "max_test_examples": 64,
                "partitioner": "iid",
            },
            "federation": {"num_clients": 1, "min_train_clients": 1, "min_evaluate_clients": 1},
            "train": {"local_steps": steps, "batch_size": batch, "learning_rate": 2e-4, "device": device},
        }
    )


def local(
    model: str,
    device: str = "cpu",
    dtype: str = "float32",
    quantization: str = "none",
    steps: int = 20,
    batch: int = 8,
    max_length: int = 128,
) -> dict:
    import torch

    from fedlora.factors import load_factors
    from fedlora.model import AdapterSpec, build_peft_model, check_device, initial_factors, place
    from fedlora.partitions import client_data
    from fedlora.training import evaluate, pick_device, train_local

    cfg = _config(model, device, dtype, quantization, steps, batch, max_length)
    dev = pick_device(device)
    check_device(cfg, dev)
    data = client_data(cfg, 0)
    t0 = time.perf_counter()
    peft_model = place(build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 16)), dev)
    load_factors(peft_model, initial_factors(peft_model, 1))
    build_seconds = time.perf_counter() - t0
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_local(peft_model, params, data.train, dataclasses.replace(cfg.train, local_steps=2), 0, dev)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    counter = TokenCounter()
    t0 = time.perf_counter()
    res = train_local(peft_model, params, data.train, cfg.train, 1, dev, hooks=[counter])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ev = evaluate(peft_model, data.test, 32, dev)
    eval_seconds = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated()
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "model": model,
        "device": dev.type,
        "dtype": dtype,
        "quantization": quantization,
        "params-total": sum(p.numel() for p in peft_model.parameters()),
        "params-lora": sum(p.numel() for p in params),
        "build-seconds": build_seconds,
        "steps": res.steps,
        "batch": batch,
        "max-length": max_length,
        "seconds-per-step": seconds / res.steps,
        "tokens-per-second": counter.attended / seconds,
        "scored-tokens-per-second": counter.scored / seconds,
        "train-loss": res.loss,
        "eval-seconds": eval_seconds,
        "eval-examples": ev["num-examples"],
        "eval-loss": ev["loss"],
        "eval-accuracy": ev.get("accuracy"),
        "peak-memory-bytes": peak,
        "peak-memory-kind": "cuda max_memory_allocated"
        if dev.type == "cuda"
        else "process peak RSS (includes Python, torch and the tokenized data)",
    }


def federation(quick: bool = False) -> dict:
    from fedlora.config import FedLoraConfig
    from fedlora.simulate import simulate

    cfg = FedLoraConfig.load(
        ROOT / "simulations" / "causal_agnews.toml",
        [f'data.dataset="{SHARED_DATA / "agnews"}"'] + (["run.rounds=2"] if quick else []),
    )
    cfg.run.output_dir = str(RESULTS / "causal-runs")
    t0 = time.perf_counter()
    run_dir = simulate(cfg)
    wall = time.perf_counter() - t0
    rows = run_dir.read_metrics()
    keep = (
        "round",
        "seconds",
        "server-loss",
        "server-perplexity",
        "server-accuracy",
        "server-unparsed",
        "personal-loss",
        "personal-accuracy-mean",
        "bytes-up-per-client",
        "client-train-seconds",
    )
    return {
        "config": "simulations/causal_agnews.toml",
        "run-dir": str(run_dir.path),
        "wall-seconds": wall,
        "rows": [{k: r.get(k) for k in keep} for r in rows],
        "seconds-per-round": [r["seconds"] for r in rows if r["round"] > 0],
    }


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in payload["federation"]["rows"] if r.get("server-loss") is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["round"] for r in rows], [r["server-loss"] for r in rows], marker="o")
    ax1.set_xlabel("round")
    ax1.set_ylabel("held-out loss per response token")
    ax1.set_title("tiny LLaMA (random init), AG News as instructions")
    acc = [(r["round"], r["server-accuracy"]) for r in rows if r.get("server-accuracy") is not None]
    if acc:
        ax2.plot(*zip(*acc), marker="o", label="generated-label accuracy")
        ax2.axhline(0.25, linestyle="--", color="0.5", label="chance (4 labels)")
        ax2.set_ylim(0, 1)
        ax2.legend()
    ax2.set_xlabel("round")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "causal.png", dpi=100)
    plt.close(fig)


def run(
    quick: bool = False,
    device: str = "cpu",
    models: tuple[str, ...] = DEFAULT_MODELS,
    dtype: str = "float32",
    quantization: str = "none",
) -> None:
    import os

    payload = {
        "local": [local(m, device, dtype, quantization, steps=5 if quick else 20) for m in models],
        "federation": federation(quick),
    }
    payload["machine-load"] = f"load average {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores"
    write("causal", payload)
    plot(payload)
    for r in payload["local"]:
        print(
            f"{r['model']} on {r['device']}: {r['seconds-per-step']:.3f} s/step, {r['tokens-per-second']:.0f} tok/s, "
            f"peak {r['peak-memory-bytes'] / 2**20:.0f} MiB"
        )
    fed = payload["federation"]
    print("federation seconds per round:", [round(s, 1) for s in fed["seconds-per-round"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    setup_env()
    run(args.quick, args.device, tuple(m for m in args.models.split(",") if m), args.dtype, args.quantization)


if __name__ == "__main__":
    main()

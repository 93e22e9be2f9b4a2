"""fedlora's training step beside a plain PEFT loop: the same model, the same batches, one process.

The plain loop is what a PEFT user writes: ``torch.optim.AdamW`` over the LoRA parameters and
transformers' own causal-LM loss (``model(**batch, labels=labels).loss``). fedlora's is
``train_local`` with its per-example response loss (what DP-SGD needs), no gradient clipping, the
same learning rate. Each of ``--runs`` runs times both loops on fresh copies of one model, in
alternating order, and reports ms per step, tokens per second (attended tokens) and the process's
peak memory; the figure is the ratio of the two in each run (the machine's noise hits both alike).

    .venv/bin/python -m benchmarks.train_step                    # CPU, builtin:tiny-llama, 3 runs
    .venv/bin/python -m benchmarks.train_step --device cuda --model PATH --dtype bfloat16 --batch 16 --max-length 512
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import resource
import time

from benchmarks.common import RESULTS, setup_env, write


def _batches(data, batch: int, steps: int) -> list:
    from fedlora.data import batches

    out = []
    while len(out) < steps:
        out.extend(b for b in batches(data, batch, shuffle=True, seed=len(out)))
    return out[:steps]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(model, fixed: list, lr: float, device) -> float:
    """Seconds for the plain PEFT loop over ``fixed`` (batch, labels) pairs."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    for batch, labels in fixed:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch, labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return time.perf_counter() - t0


def fedlora_loop(model, fixed: list, data, cfg, device) -> float:
    """Seconds for ``train_local`` on ``data`` (fedlora Examples), taking the same (batch, labels)
    pairs as the plain loop, in order."""
    from fedlora.training import TrainingHook, train_local

    class SameBatches(TrainingHook):
        def begin(self, ctx) -> None:
            ctx.batch_source = lambda epoch: iter(fixed)

    params = [p for p in model.parameters() if p.requires_grad]
    tc = dataclasses.replace(cfg.train, local_steps=len(fixed), max_grad_norm=0.0, optimizer="adamw")
    _sync(device)
    t0 = time.perf_counter()
    train_local(model, params, data, tc, 0, device, hooks=[SameBatches()])
    _sync(device)
    return time.perf_counter() - t0


def run(
    model_name: str = "builtin:tiny-llama",
    device: str = "cpu",
    dtype: str = "float32",
    batch: int = 16,
    max_length: int = 128,
    steps: int = 10,
    runs: int = 3,
) -> dict:
    import torch

    from benchmarks.causal import _config
    from fedlora.factors import load_factors
    from fedlora.model import AdapterSpec, build_peft_model, initial_factors, place
    from fedlora.partitions import client_data
    from fedlora.training import pick_device

    cfg = _config(model_name, device, dtype, "none", steps, batch, max_length)
    dev = pick_device(device)
    data = client_data(cfg, 0).train
    fixed = _batches(data, batch, steps)
    tokens = sum(int(b["attention_mask"].sum()) for b, _ in fixed)
    base = place(build_peft_model(cfg, 0, AdapterSpec.for_rank(cfg, 16)), dev)
    load_factors(base, initial_factors(base, 1))
    rows = []
    for i in range(runs + 1):  # run 0 warms both paths up and is not reported
        times = {}
        for which in ("fedlora", "plain") if i % 2 == 0 else ("plain", "fedlora"):
            model = copy.deepcopy(base)
            times[which] = (
                fedlora_loop(model, fixed, data, cfg, dev)
                if which == "fedlora"
                else plain_loop(model, fixed, cfg.train.learning_rate, dev)
            )
            del model
        if i == 0:
            continue
        rows.append(
            {
                "run": i,
                "fedlora-ms-per-step": 1000 * times["fedlora"] / steps,
                "plain-ms-per-step": 1000 * times["plain"] / steps,
                "fedlora-tokens-per-second": tokens / times["fedlora"],
                "plain-tokens-per-second": tokens / times["plain"],
                "ratio": times["fedlora"] / times["plain"],
            }
        )
        print(
            f"[train_step] run {i}: fedlora {rows[-1]['fedlora-ms-per-step']:.1f} ms/step, plain "
            f"{rows[-1]['plain-ms-per-step']:.1f} ms/step, ratio {rows[-1]['ratio']:.3f}",
            flush=True,
        )
    peak = (
        torch.cuda.max_memory_allocated()
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    ratios = sorted(r["ratio"] for r in rows)
    payload = {
        "model": model_name,
        "device": dev.type,
        "dtype": dtype,
        "batch": batch,
        "max-length": max_length,
        "steps": steps,
        "tokens-per-run": tokens,
        "rows": rows,
        "ratio-median": ratios[len(ratios) // 2],
        "ratio-max": ratios[-1],
        "peak-memory-bytes": peak,
        "peak-memory-kind": "cuda max_memory_allocated" if dev.type == "cuda" else "process peak RSS",
    }
    write("train_step" if dev.type == "cpu" else f"train_step-{dev.type}", payload)
    plot(payload, dev.type)
    return payload


def plot(payload: dict, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["run"] for r in rows]
    ax.bar([i - 0.2 for i in x], [r["fedlora-ms-per-step"] for r in rows], width=0.4, label="fedlora train_local")
    ax.bar([i + 0.2 for i in x], [r["plain-ms-per-step"] for r in rows], width=0.4, label="plain PEFT + AdamW")
    ax.set_xlabel("run")
    ax.set_ylabel("ms per step")
    ax.set_title(
        f"{payload['model']} ({payload['device']}, batch {payload['batch']}, {payload['max-length']} "
        f"tokens): ratio {payload['ratio-median']:.3f}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / ("train_step.png" if kind == "cpu" else f"train_step-{kind}.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    setup_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    run(a.model, a.device, a.dtype, a.batch, a.max_length, a.steps, a.runs)

"""Local training throughput of one client: plain LoRA, DyLoRA, DP-SGD (Opacus), DP + DyLoRA.

The packaged all-MiniLM-L6-v2 with LoRA r=8 on q,v and a trained head, real AG News text from
../shared/data at 48 tokens. DP-SGD is Opacus' ``PrivacyEngine`` in ``hooks`` mode (per-sample
gradients, clipping at 1.0, noise multiplier 1.0); DyLoRA resamples the rank every step with
:class:`fedlora.dylora.RankMask`. Figures are examples per second after warm-up. Absolute GPU
figures come only from a run on a GPU (``--device cuda``).
"""

from __future__ import annotations

import random
import time

from benchmarks.common import SHARED_DATA, write


def _setup(device: str, batch: int, max_length: int = 48):  # noqa: ANN202
    import torch

    from fedlora.config import FedLoraConfig
    from fedlora.data import load_task
    from fedlora.model import AdapterSpec, build_peft_model, set_trainable

    cfg = FedLoraConfig.from_dict({
        "model": {"name": "builtin:all-MiniLM-L6-v2", "max_length": max_length},
        "data": {"dataset": str(SHARED_DATA / "agnews"), "max_train_examples": 2048, "max_test_examples": 64},
    })
    task = load_task(cfg)
    model = build_peft_model(cfg, task.num_labels, AdapterSpec(8, 16.0, 0.0, ("query", "value"))).to(device)
    params = set_trainable(model, frozenset({"A", "B", "head"}))
    # Fixed-width batches so every mode sees the same work (Opacus needs a DataLoader anyway).
    ids = torch.zeros((len(task.train), max_length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, x in enumerate(task.train.input_ids):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    ds = torch.utils.data.TensorDataset(ids, mask, task.train.labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)
    return model, params, loader


def _measure(mode: str, device: str, batch: int, steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F

    from fedlora.dylora import RankMask

    model, params, loader = _setup(device, batch)
    model.train()
    opt = torch.optim.SGD(params, lr=0.05)
    dp = mode.startswith("dp")
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                                 noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
                                                 grad_sample_mode="hooks")
    mask = RankMask(model._module if dp else model) if "dylora" in mode else None
    rng = random.Random(0)
    seen, t0, it = 0, None, iter(loader)
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0, seen = time.perf_counter(), 0
        try:
            ids, att, labels = next(it)
        except StopIteration:
            it = iter(loader)
            ids, att, labels = next(it)
        if mask is not None:
            mask.set(rng.randint(1, mask.max_rank))
        ids, att, labels = ids.to(device), att.to(device), labels.to(device)
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=att).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(labels)
    if device == "cuda":
        torch.cuda.synchronize()
    eps = seen / (time.perf_counter() - t0)
    if mask is not None:
        mask.remove()
    if dp:
        model._close()  # Opacus: remove its hooks; the cached model is reused by the next mode
    return eps


def run(quick: bool = False, device: str = "cpu") -> dict:
    import torch

    batch = 16 if device == "cpu" else 64
    steps = (6 if quick else 12) if device == "cpu" else 40
    rows = []
    for mode in ("lora", "dylora", "dp", "dp+dylora"):
        eps = _measure(mode, device, batch, steps, warmup=2 if device == "cpu" else 5)
        rows.append({"mode": mode, "examples_per_second": eps})
        print(f"  throughput {device} {mode:10s} {eps:8.1f} examples/s", flush=True)
    base = rows[0]["examples_per_second"]
    for r in rows:
        r["relative_to_lora"] = r["examples_per_second"] / base
    payload = {"device": device, "batch_size": batch, "max_length": 48, "threads": torch.get_num_threads(), "rows": rows}
    write(f"throughput-{device}", payload)
    return payload

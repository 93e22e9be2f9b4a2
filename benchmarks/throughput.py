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

from benchmarks.common import ROOT, SHARED_DATA, write

ASSETS = ROOT / "benchmarks" / "assets"


def _setup(device: str, batch: int, max_length: int = 48, synthetic: bool = False):
    """(PEFT model, trainable params, loader of fixed-width batches).

    Real: the packaged pretrained MiniLM and AG News from ../shared/data. Synthetic (a GPU box
    without the data, the weights package or flwr): MiniLM's own architecture from its config.json
    with random weights, random token ids; the arithmetic per step is the same.
    """
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from fedlora.model import set_trainable

    if synthetic:
        config = AutoConfig.from_pretrained(str(ASSETS / "all-MiniLM-L6-v2.config.json"), num_labels=4)
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_config(config)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, config.vocab_size, (2048, max_length), generator=g)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 4, (2048,), generator=g)
    else:
        from fedlora.config import FedLoraConfig
        from fedlora.data import load_task
        from fedlora.model import packaged_minilm_dir

        cfg = FedLoraConfig.from_dict(
            {
                "model": {"name": "builtin:all-MiniLM-L6-v2", "max_length": max_length},
                "data": {"dataset": str(SHARED_DATA / "agnews"), "max_train_examples": 2048, "max_test_examples": 64},
            }
        )
        task = load_task(cfg)
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(
            str(packaged_minilm_dir()), num_labels=task.num_labels
        )
        ids = torch.zeros((len(task.train), max_length), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, x in enumerate(task.train.input_ids):
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        labels = task.train.labels
    model = get_peft_model(
        base,
        LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"]),
    ).to(device)
    params = set_trainable(model, frozenset({"A", "B", "head"}))
    ds = torch.utils.data.TensorDataset(ids, mask, labels)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True)
    return model, params, loader


def _measure(mode: str, device: str, batch: int, steps: int, warmup: int, synthetic: bool) -> float:
    import torch
    import torch.nn.functional as F

    from fedlora.dylora import RankMask

    model, params, loader = _setup(device, batch, synthetic=synthetic)
    model.train()
    opt = torch.optim.SGD(params, lr=0.05)
    dp = mode.startswith("dp")
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        model, opt, loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            grad_sample_mode="hooks",
        )
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
    return eps


def run(quick: bool = False, device: str = "cpu", synthetic: bool | None = None) -> dict:
    import torch

    if synthetic is None:
        synthetic = not (SHARED_DATA / "agnews").exists()

    batch = 16 if device == "cpu" else 64
    steps = (6 if quick else 12) if device == "cpu" else 40
    rows = []
    for mode in ("lora", "dylora", "dp", "dp+dylora"):
        eps = _measure(mode, device, batch, steps, warmup=2 if device == "cpu" else 5, synthetic=synthetic)
        rows.append({"mode": mode, "examples_per_second": eps})
        print(f"  throughput {device} {mode:10s} {eps:8.1f} examples/s", flush=True)
    base = rows[0]["examples_per_second"]
    for r in rows:
        r["relative_to_lora"] = r["examples_per_second"] / base
    payload = {
        "device": device,
        "batch_size": batch,
        "max_length": 48,
        "inputs": "random weights and tokens, MiniLM architecture" if synthetic else "pretrained MiniLM, AG News",
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    write(f"throughput-{device}", payload)
    return payload

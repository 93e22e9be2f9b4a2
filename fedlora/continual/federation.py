"""What the server does for a task sequence: switch tasks, hand every client the finished tasks'
factors, keep them in the checkpoint.

When a task ends, the global adapter at that moment (effective form, full rank) becomes that task's
frozen LoRA, the same for every client; the next task starts a fresh adapter: A from the seed
``lora.init_seed + 1000 * task`` (every party rebuilds it), B zero, and the head and selector as they
were. A client that does not hold every finished task yet (it reports ``past-tasks`` in each reply)
receives them all with its next message, under the wire prefix ``past<t>/``; it keeps them in its
client-state store. Sequential LoRA ('seq') and multi-task training keep one adapter throughout.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from fedlora import codec
from fedlora.continual.mixing import TaskLoraMixer
from fedlora.continual.tasks import task_of_round
from fedlora.factors import LoraFactors, ModuleFactors, seeded_A
from fedlora.lora_math import to_effective

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from fedlora.extensions import GlobalAdapter

PAST_PREFIX = "past{}/"  # wire namespace of finished task t (fedlora.codec skips it unless asked)
PAST_KEY = "past-tasks"  # reply metric: how many finished tasks' factors the client holds


def keeps_past_tasks(cfg) -> bool:
    return cfg.continual.method in ("inclora", "olora", "amlora")


def task_seed(cfg, task: int) -> int:
    """The seed of task ``task``'s fresh adapter (a new LoRA per task starts from its own A)."""
    return cfg.lora.init_seed + (1000 * task if keeps_past_tasks(cfg) else 0)


def fresh_adapter(template: LoraFactors, seed: int) -> LoraFactors:
    """Seed-built A, zero B, at the template's shapes and alphas (client form)."""
    return LoraFactors(
        modules={
            n: ModuleFactors(A=seeded_A(seed, n, m.A.shape[0], m.A.shape[1]), B=torch.zeros_like(m.B), alpha=m.alpha)
            for n, m in template.modules.items()
        }
    )


def switch_task(run: GlobalAdapter, past: list[LoraFactors], server_round: int) -> None:
    """Before ``server_round`` trains: freeze every task that has ended since the last round (appended
    to ``past``) and start the next task's fresh adapter in ``run.global_eff``."""
    cfg = run.cfg
    if not keeps_past_tasks(cfg):
        return
    task = task_of_round(cfg, server_round)
    while len(past) < task:
        finished = len(past)
        done = LoraFactors()
        for n, m in run.global_eff.modules.items():
            a = m.A
            if a is None:  # FFA-LoRA: A never travels; it is the finished task's seed-built A
                fan_in = run.template.modules[n].A.shape[1]
                a = seeded_A(task_seed(cfg, finished), n, m.B.shape[1], fan_in)
            done.modules[n] = ModuleFactors(A=a.clone(), B=m.B.clone(), alpha=float(m.B.shape[1]))
        past.append(done)
        start = fresh_adapter(run.template, task_seed(cfg, len(past)))
        fresh = run.initial_global(to_effective(start))
        run.global_eff = LoraFactors(modules=fresh.modules, extras=dict(run.global_eff.extras))


def add_past_tasks(past: list[LoraFactors], record: ArrayRecord, wire_dtype: str, modules: list[str]) -> None:
    """Put every finished task's factors into an outgoing ArrayRecord, each under ``past<t>/``."""
    for t, factors in enumerate(past):
        for k, v in codec.encode(factors, wire_dtype, prefix=PAST_PREFIX.format(t), modules=modules).items():
            record[k] = v


def past_tensors(past: list[LoraFactors]) -> dict[str, torch.Tensor]:
    """The finished tasks' factors as checkpoint tensors (``past<t>/<module>/<A|B>``)."""
    return {f"past{t}/{k}": v for t, p in enumerate(past) for k, v in p.tensors()}


def load_past(tensors: dict[str, torch.Tensor], count: int) -> tuple[list[LoraFactors], dict[str, torch.Tensor]]:
    """The ``count`` finished tasks from a checkpoint's tensors, and the other tensors."""
    past = []
    for t in range(count):
        pre = f"past{t}/"
        flat = {k[len(pre) :]: v for k, v in tensors.items() if k.startswith(pre)}
        alpha = {k.rpartition("/")[0]: float(v.shape[0]) for k, v in flat.items() if k.endswith("/A")}
        past.append(LoraFactors.from_tensors(flat, alpha))
    return past, {k: v for k, v in tensors.items() if not codec.namespaced(k)}


@contextmanager
def task_lora(cfg, model, past: list[LoraFactors]):
    """The method's forward pass while the block runs: finished tasks' LoRAs added (IncLoRA, O-LoRA)
    or mixed (AM-LoRA); the model (cached per process) is restored after. Server and clients alike."""

    if not keeps_past_tasks(cfg):
        yield None
        return
    c = cfg.continual
    mixer = TaskLoraMixer(model, past, "attention" if c.method == "amlora" else "sum", c.amlora_temperature)
    try:
        yield mixer
    finally:
        mixer.remove()

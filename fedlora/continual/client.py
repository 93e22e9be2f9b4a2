"""A client's side of a task sequence: this round's task data, the finished tasks' frozen LoRAs in
the forward pass, and the method's loss terms on the one training loop.

Finished tasks arrive from the server (wire namespace ``past<t>/``, effective form) and are kept in
the client-state store under the run's config digest, so a client restarted between tasks recovers
them from disk; its replies say how many it holds (``past-tasks``), and the server resends what is
missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fedlora import codec
from fedlora.continual.federation import PAST_PREFIX, keeps_past_tasks
from fedlora.continual.hooks import AmLoraTraining, OLoraPenalty
from fedlora.continual.mixing import TaskLoraMixer
from fedlora.continual.tasks import task_of_round
from fedlora.extensions import ClientRound
from fedlora.factors import LoraFactors
from fedlora.training import TrainingHook

if TYPE_CHECKING:
    from fedlora.config import FedLoraConfig


class MissingPastTask(RuntimeError):
    """The client holds neither in its message nor in its store a finished task it needs."""


def _store_name(cfg: FedLoraConfig, t: int) -> str:
    return f"continual-{cfg.digest()}-task{t}"


def past_tasks(client: ClientRound) -> list[LoraFactors]:
    """Finished tasks' factors for ``client.server_round``: from the message when it carries them
    (then stored), else from the client-state store."""
    cfg = client.cfg
    if not keeps_past_tasks(cfg):
        return []
    task = task_of_round(cfg, client.server_round)
    out = []
    for t in range(task):
        got = codec.decode(client.arrays, alpha=1.0, prefix=PAST_PREFIX.format(t), modules=client.modules)
        if got.modules:
            for m in got.modules.values():
                m.alpha = float(m.rank)  # effective form: the scaling lives in B
            client.store.save(client.client_id, _store_name(cfg, t), got)
        else:
            got = client.store.load(client.client_id, _store_name(cfg, t))
        if got is None:
            raise MissingPastTask(
                f"client {client.client_id} holds no factors of finished task {t}; "
                "the server resends them with its next message"
            )
        out.append(got)
    return out


def held(client: ClientRound) -> int:
    """How many finished tasks this client holds, consecutively from the first."""
    n = 0
    while client.store.has(client.client_id, _store_name(client.cfg, n)):
        n += 1
    return n


def method_hooks(cfg: FedLoraConfig, mixer: TaskLoraMixer | None, past: list[LoraFactors]) -> list[TrainingHook]:
    """The method's loss terms on the training loop: O-LoRA's penalty, AM-LoRA's selector step."""
    c = cfg.continual
    if c.method == "olora" and (past or c.olora_lambda2):
        past_a = {n: torch.cat([p.modules[n].A for p in past], 0) for n in (past[0].modules if past else {})}
        return [OLoraPenalty(past_a, c.olora_lambda1, c.olora_lambda2, c.olora_form)]
    if c.method == "amlora" and mixer is not None:
        # Also at amlora_l1 = 0: the hook clears the attention the mixer records each training
        # forward, which would otherwise pile up (with its autograd graph) for the whole round.
        return [AmLoraTraining(mixer, c.amlora_l1, c.amlora_selector_lr)]
    return []

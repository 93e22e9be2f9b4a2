"""LwF as a continual method (Li and Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017),
the other classic baseline in O-LoRA's comparison: one LoRA is trained on task after task (as
``seq``), and while task t > 0 trains every client adds to its loss

    weight * T^2 * KL(softmax(z_old / T) || softmax(z / T))

on each batch, where z are the model's logits over the finished tasks' labels and z_old those of
the model task t started from (the old model, dropout off), T = ``lwf.temperature`` (the paper's 2).
The paper records the old model's responses once before training; here they are computed for each
batch with the old parameters swapped in (the same values: the old model is fixed), so nothing
proportional to the data is stored. The KL form has the paper's modified cross-entropy's gradient
(they differ by the old outputs' entropy, a constant); T^2 keeps its scale as T changes (Hinton et
al.'s distillation).

Each client keeps the old model's trainable parameters in its client-state store: it takes them as
the global model it receives in the first round it trains on task t (the model task t-1 ended with,
when it takes part in that round; the continual comparison samples every client every round).
Refused with DP-SGD (not built: the old model's forward pass is not per-example clipped by Opacus).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlora.extensions import ClientRound, Extension
from fedlora.registry import register_extension
from fedlora.schema import ConfigError, _meta, _require

if TYPE_CHECKING:
    from fedlora.config import FedLoraConfig
    from fedlora.sharing import SharingPolicy


@dataclass
class LwFSection:
    """``[lwf]``: the distillation term's weight and temperature."""

    weight: float = _meta(
        "LwF's lambda_o: the weight of distillation toward the old model's outputs on the "
        "finished tasks' labels (continual.method = 'lwf'; the paper's 1).",
        default=1.0,
    )
    temperature: float = _meta("LwF's temperature T on both models' logits (the paper's 2).", default=2.0)

    def validate(self) -> None:
        _require(
            math.isfinite(self.weight) and self.weight >= 0, "lwf.weight", f"must be finite and >= 0, got {self.weight}"
        )
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            "lwf.temperature",
            f"must be finite and > 0, got {self.temperature}",
        )


@register_extension
class LwF(Extension):
    """LwF: one LoRA over the task sequence, distilled toward the old model's outputs on the finished tasks' labels."""

    name = "lwf"
    section_name = "lwf"
    section = LwFSection
    continual_method = "lwf"

    @classmethod
    def check_with_run(cls, cfg: FedLoraConfig, policy: SharingPolicy) -> None:
        if cfg.privacy.example_dp:
            raise ConfigError(
                "invalid config for 'continual.method': LwF with example-level DP (privacy.example_dp) "
                "is not built (the old model's forward pass would sit outside Opacus' per-example "
                "clipping); use client-level DP (privacy.client_dp) with it"
            )

    @contextmanager
    def training(self, client: ClientRound) -> Iterator[list]:
        from fedlora.methods._lwf import distillation  # torch: the client's training only

        section = self.cfg.section("lwf")
        yield distillation(client, section.weight, section.temperature)

"""The server's view of the model: the adapter's structure, the global adapter loaded into a model
to evaluate, and the run's final adapter written in PEFT's format (the exporter)."""

from __future__ import annotations

from pathlib import Path

import torch

from fedlora.config import FedLoraConfig
from fedlora.factors import LoraFactors, load_factors
from fedlora.lora_math import to_client
from fedlora.model import (
    AdapterSpec,
    build_peft_model,
    check_device,
    initial_factors,
    merge_delta_into_base,
    place,
    skeleton_peft_model,
    write_adapter,
)
from fedlora.registry import model_extensions
from fedlora.strategies.base import LoraStrategy
from fedlora.training import pick_device


def reference_rank(cfg: FedLoraConfig) -> int:
    """The rank the global adapter is kept at: the largest any client trains."""
    return max(cfg.client_rank(i) for i in range(cfg.federation.num_clients))


class GlobalModel:
    """The adapter's structure (module names, factor shapes, LoRA config) to start, check and save
    the global adapter, and, when the server evaluates (``federation.server_eval``) or an extension
    shapes the model (a task sequence's label-name head needs the real embeddings), a copy of the
    model to evaluate it with.

    Otherwise the server holds no base weights at all: the structure is built on PyTorch's meta
    device, so aggregating a 7B model's factors costs the factors' memory only."""

    def __init__(self, cfg: FedLoraConfig, label_names: list[str], rank: int) -> None:
        self.label_names = list(label_names)
        self.num_labels = len(label_names)
        self.cfg = cfg
        self.rank = rank
        self.alpha = cfg.lora.alpha_for_rank(rank)
        self.device = pick_device(cfg.train.device)
        spec = AdapterSpec.for_rank(cfg, rank)
        check_device(cfg, self.device)
        if cfg.federation.server_eval or model_extensions(cfg):
            self.structure = place(build_peft_model(cfg, self.num_labels, spec, self.label_names), self.device)
        else:
            self.structure = skeleton_peft_model(cfg, self.num_labels, spec, self.label_names)
        self.init = initial_factors(self.structure, cfg.lora.init_seed)

    def template(self) -> LoraFactors:
        return self.init

    def load(self, strategy: LoraStrategy) -> torch.nn.Module:
        """Load the strategy's global adapter; frozen parts come from the shared seed."""
        g = strategy.global_eff
        model = place(
            build_peft_model(self.cfg, self.num_labels, AdapterSpec.for_rank(self.cfg, self.rank), self.label_names),
            self.device,
        )
        if strategy.sharing_policy.merge_global_into_base:
            load_factors(model, self._flora_start(g))
            if g.modules:
                merge_delta_into_base(model, g)
        else:
            load_factors(model, self.start(strategy).merged_with(to_client(g, self.rank, self.alpha)))
        return model

    def _flora_start(self, g: LoraFactors) -> LoraFactors:
        """FLoRA's adapter on top of the merged base: the seed's A, a zero B, the global head."""
        zero = LoraFactors(
            modules={n: type(m)(A=m.A, B=torch.zeros_like(m.B), alpha=m.alpha) for n, m in self.init.modules.items()},
            extras=self.init.extras,
        )
        return zero.merged_with(LoraFactors(extras=g.extras))

    def start(self, strategy: LoraStrategy) -> LoraFactors:
        """What the clients start from: the seed-built adapter and the initial head, as the run's
        extensions change it (a task sequence: the current task's seed)."""
        start = self.init
        for e in strategy.extensions:
            start = e.client_start(start)
        return start

    def save(self, strategy: LoraStrategy, path: Path) -> Path:
        """Write the global adapter in PEFT's format, from its factors (no model needed); the run's
        extensions decide what it holds (:meth:`fedlora.extensions.Extension.export`)."""
        g = strategy.global_eff
        if strategy.sharing_policy.merge_global_into_base:
            # FLoRA: the merged model is base + the cumulative delta; save that delta as an adapter of
            # its rank, whose scaling is 1 (alpha = r): its B carries the scaling already.
            factors = (
                LoraFactors(
                    modules={n: type(m)(A=m.A, B=m.B, alpha=float(m.rank)) for n, m in g.modules.items()},
                    extras=dict(g.extras),
                )
                if g.modules
                else self._flora_start(g)
            )
        else:
            factors = self.start(strategy).merged_with(to_client(g, self.rank, self.alpha))
            for e in strategy.extensions:
                factors = e.export(strategy, factors, path)
        return write_adapter(path, self.structure, factors, self.cfg.model.name, self.label_names)

"""The continual methods' part of the model the core builds, installed through the core's model
extension registry (:func:`fedlora.registry.model_extensions`): the frozen label-name head
(``continual.head = "label-names"``) and AM-LoRA's attention selector over the task LoRAs. The
model builder never imports this package; it asks the registry."""

from __future__ import annotations

import torch

from fedlora.continual.head import install_label_name_head
from fedlora.model_sources import load_tokenizer
from fedlora.registry import register_model_extension


class ContinualModel:
    """A task sequence's changes to the model: see the module docstring."""

    def applies(self, cfg) -> bool:  # noqa: ANN001
        return cfg.continual.enabled

    def cache_key(self, cfg, label_names: list[str] | None) -> tuple:  # noqa: ANN001
        c = cfg.continual
        return (c.method, len(c.tasks), c.head, c.head_scale, tuple(label_names or ()))

    def prepare_base(self, cfg, base: torch.nn.Module, label_names: list[str] | None) -> bool:  # noqa: ANN001
        c = cfg.continual
        if c.head != "label-names":
            return False

        if label_names is None:
            raise ValueError("a frozen label-name head (continual.head) needs the run's label names")
        install_label_name_head(base, load_tokenizer(cfg.model.name, cfg.model.cache_dir), label_names, c.head_scale)
        return True

    def after_peft(self, cfg, model: torch.nn.Module) -> None:  # noqa: ANN001
        if cfg.continual.method == "amlora":
            # lazy: the continual-learning concern, loaded only by a continual run
            from fedlora.continual.mixing import attach_selector

            attach_selector(model, len(cfg.continual.tasks))


register_model_extension(ContinualModel())
